"""`fleetpki serve`: the service sites plus, when asked, the embedded broker, until a signal."""

from __future__ import annotations

from pathlib import Path

from enroll_server.server import serve_forever, start_server


async def run_service(
    home: Path,
    *,
    est_port: int | None = None,
    http_port: int | None = None,
    mqtt_port: int | None = None,
    broker: bool = True,
    bind: str | None = None,
) -> None:
    handle = await start_server(
        home,
        est_port=est_port,
        http_port=http_port,
        mqtt_port=mqtt_port,
        broker=broker,
        bind=bind,
    )
    await serve_forever(handle)
