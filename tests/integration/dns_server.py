"""A small authoritative DNS server for the resolver tests, run by a test
inside a namespace: ``python dns_server.py HOST PORT``. ``*.example.``
answers A 192.0.2.<n> where n counts the queries so far (so a cached answer
is told apart from a fresh one); names starting with ``drop`` get no answer
(the resolver's timeout); anything else NXDOMAIN. Prints "ready"."""

from __future__ import annotations

import socket
import sys

import dns.message
import dns.rcode
import dns.rrset


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print("ready", flush=True)
    served = 0
    while True:
        data, addr = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        name = query.question[0].name.to_text()
        if name.startswith("drop"):
            continue
        served += 1
        response = dns.message.make_response(query)
        if name.endswith(".example."):
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", f"192.0.2.{served % 250}"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(response.to_wire(), addr)


if __name__ == "__main__":
    main()
