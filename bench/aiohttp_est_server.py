"""The issue's own calibration server: `bench/enroll.py --server aiohttp`.

Issue 2 calibrates its 1.5 x target with "a bare aiohttp handler doing only CSR verify +
issue (no registry, no policy)", measured there at 1.9 x the floor (1.74 x with uvloop). This
is that server: aiohttp's stock TLS server (asyncio's SSL transport, aiohttp's HTTP parser) and
one handler that decodes, verifies, signs and answers, so BENCHMARKS.md can set the issue's
calibration figure beside ours, measured by the same bench against the same floor.

    python bench/aiohttp_est_server.py --home H --est-port P [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bare_est_server import Calibration

from enroll_server.transport.loop import install_fast_loop


def main() -> None:
    calibration = Calibration()
    ap = argparse.ArgumentParser()
    ap.add_argument("--uvloop", action="store_true", help="uvloop instead of stock asyncio")
    args, _ = ap.parse_known_args()

    async def simpleenroll(request: web.Request) -> web.StreamResponse:
        reply = calibration.reply(
            request.headers.get("Authorization", "").encode(), await request.read()
        )
        if reply is None:
            raise web.HTTPBadRequest(text="bad CSR signature")
        body = reply.partition(b"\r\n\r\n")[2]
        return web.Response(
            body=body,
            headers={
                "Content-Type": "application/pkcs7-mime; smime-type=certs-only",
                "Content-Transfer-Encoding": "base64",
            },
        )

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/.well-known/est/simpleenroll", simpleenroll)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", calibration.port, ssl_context=calibration.tls)
        await site.start()
        await asyncio.Event().wait()

    if args.uvloop:
        install_fast_loop()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
