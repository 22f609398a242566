"""dnsd: the node's DNS resolver (``--enable-dns``, TRANSPORTS.md 3.4)."""
