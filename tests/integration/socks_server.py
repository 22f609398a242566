"""A small SOCKS5 server for the proxy tests, run by a test inside a
namespace: ``python socks_server.py HOST PORT MODE``. MODE ``valid``: no
authentication, CONNECT to IPv4/IPv6/domain targets; ``auth``: answers the
greeting with "no acceptable methods" (05 FF); ``junk``: answers anything
with an HTTP error line. Prints "ready" once listening; runs until killed."""

from __future__ import annotations

import asyncio
import ipaddress
import sys


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        pass


async def handle(mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readexactly(2)
        if mode == "junk":
            writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            return
        await reader.readexactly(head[1])
        if mode == "auth":
            writer.write(b"\x05\xff")
            return
        writer.write(b"\x05\x00")
        ver, cmd, _rsv, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        port = int.from_bytes(await reader.readexactly(2), "big")
        if ver != 5 or cmd != 1:
            writer.write(b"\x05\x07\x00\x01" + bytes(6))
            return
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))
            return
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        up_w.close()
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


async def main() -> None:
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = await asyncio.start_server(lambda r, w: handle(mode, r, w), host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
