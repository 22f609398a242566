"""proxyd: finds SOCKS5 proxies on other overlay nodes and relays a local
port to the chosen one (TRANSPORTS.md 3.1)."""
