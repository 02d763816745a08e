"""The least an EST simpleenroll server can do in Python, for calibration: `--server minimal`.

No transport or protocol classes, no request validation, no token, no policy, no registry:
one callback per connection that accepts, wraps the socket in OpenSSL's socket object,
handshakes, reads until the body is there, verifies the CSR, signs the certificate and
writes the PKCS#7 reply, then close_notify and close. It answers only well-formed requests
from bench/enroll.py. What it spends over the raw floor is what Python, OpenSSL's socket I/O,
the kernel's TCP and the event loop cost per fresh connection here; BENCHMARKS.md compares it
with the bare server (the real transport) and with `fleetpki serve`.

    python bench/minimal_est_server.py --home H --est-port P
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bare_est_server import Calibration  # bench/, this script's folder

from enroll_server.transport.loop import install_fast_loop


def main() -> None:
    calibration = Calibration()
    tls = calibration.tls

    def reply(buf: bytes) -> bytes | None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        length, auth = 0, b""
        for line in buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"authorization":
                auth = value.strip()
        body = buf[end + 4 :]
        if len(body) < length:
            return None
        out = calibration.reply(auth, body)
        if out is None:
            raise ValueError("bad CSR signature")
        return out

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        listener.bind(("127.0.0.1", calibration.port))
        listener.listen(1024)
        listener.setblocking(False)

        def connection(raw: socket.socket) -> None:
            conn: Any = tls._wrap_socket(raw, server_side=True, server_hostname=None)  # type: ignore[attr-defined]
            fd = raw.fileno()
            state = {"handshaken": False, "buf": b""}

            def done() -> None:
                loop.remove_reader(fd)
                try:
                    conn.shutdown()
                except (ssl.SSLError, OSError, ValueError):
                    pass
                raw.close()

            def step() -> None:
                try:
                    if not state["handshaken"]:
                        conn.do_handshake()
                        state["handshaken"] = True
                    while True:
                        data = conn.read(65536)
                        if not data:
                            done()
                            return
                        state["buf"] += data
                        out = reply(state["buf"])  # type: ignore[arg-type]
                        if out is not None:
                            conn.write(out)
                            done()
                            return
                except ssl.SSLWantReadError:
                    return
                except (ssl.SSLError, OSError, ValueError):
                    done()

            loop.add_reader(fd, step)
            step()

        def accept() -> None:
            for _ in range(64):
                try:
                    raw, _ = listener.accept()
                except BlockingIOError:
                    return
                raw.setblocking(False)
                connection(raw)

        loop.add_reader(listener.fileno(), accept)
        gc.freeze()
        await asyncio.Event().wait()

    install_fast_loop()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
