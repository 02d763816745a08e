"""`fleetpki serve`: the service sites plus, when asked, the embedded broker, until a signal."""

from __future__ import annotations

import gc
from pathlib import Path

from enroll_server.web.provisioner import Provisioner
from enroll_server.wiring.server import serve_forever, start_server


async def run_service(
    home: Path,
    *,
    est_port: int | None = None,
    http_port: int | None = None,
    mqtt_port: int | None = None,
    admin_port: int | None = None,
    broker: bool = True,
    bind: str | None = None,
    admin_bind: str | None = None,
    max_packet_size: int | None = None,
    registry_at: str | None = None,
    provisioner: Provisioner | None = None,
) -> None:
    handle = await start_server(
        home,
        est_port=est_port,
        http_port=http_port,
        mqtt_port=mqtt_port,
        admin_port=admin_port,
        broker=broker,
        bind=bind,
        admin_bind=admin_bind,
        max_packet_size=max_packet_size,
        registry_at=registry_at,
        provisioner=provisioner,
    )
    # Everything allocated so far (modules, the CA, the app) lives as long as the process:
    # move it out of the collector's sight, so the young-generation collections that the
    # per-request garbage triggers never rescan it (https://docs.python.org/3/library/gc.html).
    gc.freeze()
    await serve_forever(handle)
