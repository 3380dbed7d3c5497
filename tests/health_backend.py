"""Health endpoints a lab real server runs for the keepalived tests.

``python3 tests/health_backend.py DIR NAME``: HTTP on 8000 (the status code
is read from DIR/status at each request, default 200; DIR/delay seconds
before answering), SMTP on 2525 (220/250/221), DNS on UDP 5353 (one answer
to any query).  Standard library only; prints ``ready`` when listening.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path


def _read(path: Path, default: str) -> str:
    try:
        return path.read_text().strip() or default
    except OSError:
        return default


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: Path, name: str) -> None:
    try:
        while (await reader.readline()).strip():
            pass
        await asyncio.sleep(float(_read(where / "delay", "0")))
        status = int(_read(where / "status", "200"))
        body = f"{name}\n".encode()
        writer.write(f"HTTP/1.0 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
    except (OSError, ValueError):
        pass
    finally:
        writer.close()


async def smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(b"220-lab ESMTP\r\n220 ready\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"HELO"):
                writer.write(b"250 lab hello\r\n")
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"500 what\r\n")
    except OSError:
        pass
    finally:
        writer.close()


class Dns(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        ident = data[:2]
        question = data[12:]
        answer = b"\xc0\x0c" + question[-4:] + struct.pack("!IH", 60, 4) + b"\x7f\x00\x00\x01"
        self.transport.sendto(ident + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer, addr)


async def main(where: Path, name: str) -> None:
    servers = [await asyncio.start_server(lambda r, w: http(r, w, where, name), "0.0.0.0", 8000),
               await asyncio.start_server(smtp, "0.0.0.0", 2525)]
    await asyncio.get_running_loop().create_datagram_endpoint(Dns, local_addr=("0.0.0.0", 5353))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
