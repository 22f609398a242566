"""Where the message, topic and proxy APIs plug in.

An extension is a function taking an ``ApiContext``. It adds its HTTP
routes to ``ctx.http`` (a Flask app; raise ``core.ApiError`` for failures
and use ``app.json_body`` to read a request body with the reference's
415/400/422 behaviour) and its JSON-RPC methods to ``ctx.rpc`` with
``ctx.rpc.add(name, fn, rpc.Param(...), ...)``, both calling one shared
implementation, as ``core.NodeApi`` does for the admin operations. Add it
to ``register_all`` below; apid registers them in order at start-up.

Example (services/apid/messages.py)::

    def register(ctx: ApiContext) -> None:
        impl = Messages(ctx.call)

        @ctx.http.get("/api/v1/messages/topics/default")
        def default_action():
            return {"accept": impl.default_action()}

        ctx.rpc.add("getDefaultTopicAction", impl.default_action)
"""

from __future__ import annotations

from .context import ApiContext

__all__ = ["ApiContext", "register_all"]  # extensions may import ApiContext from here


def register_all(ctx: ApiContext) -> None:
    from . import messages, proxy, security  # loaded when apid starts, not when this module is imported

    for register in (messages.register, proxy.register, security.register):
        register(ctx)
