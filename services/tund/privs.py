"""tund's privilege drop (keep CAP_NET_ADMIN only); the mechanism is
common/privs.py, shared with dnsd."""

from common.privs import drop_to_net_admin, effective_caps

__all__ = ["drop_to_net_admin", "effective_caps"]
