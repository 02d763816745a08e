"""A real fleetpki service on 127.0.0.1:0 in a background thread, for tests and benchmarks.

Running it in its own thread and event loop lets tests use blocking clients (curl, openssl,
paho, subprocesses) and async clients alike without starving the server.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from enroll_server.enrollment.operators import set_admin_token
from enroll_server.home.config import ServerConfig
from enroll_server.home.layout import (
    HomeLayout,
    hash_secret,
    init_home,
    new_secret,
    registry_location,
)
from enroll_server.pki.profile import DeviceProfile
from enroll_server.registry import Registry
from enroll_server.wiring.server import ServerHandle, start_server
from fleetpki.atomic_file import write_atomic
from fleetpki.identity import DeviceId
from provisioning.admin import Provisioning

T = TypeVar("T")


PASSWORD_FILE = "registry.password"


def make_home(path: Path, *, registry_password: str | None = None, **config: Any) -> HomeLayout:
    """`fleetpki init` in-process: CA hierarchy, server certificate, registry, admin token.

    `registry="postgresql://user@host/db"` (config) puts the registry in that empty database,
    `registry_password` in H/registry.password (fleetpki.toml's registry_password_file)."""
    if registry_password is not None:
        config["registry_password_file"] = PASSWORD_FILE
    cfg = ServerConfig(**config)
    now = datetime.now(UTC)
    result = init_home(path, cfg, now)
    if registry_password is not None:
        write_atomic(result.layout.root / PASSWORD_FILE, registry_password.encode() + b"\n")
    with Registry.open(registry_location(result.layout), create=True) as registry:
        set_admin_token(registry, result.admin_token, now, actor="test")
    return result.layout


@dataclass
class LiveServer:
    layout: HomeLayout
    handle: ServerHandle
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    registry: Registry  # a second connection, owned by the test thread
    _stopped: bool = field(default=False)

    @property
    def est_url(self) -> str:
        return f"https://127.0.0.1:{self.handle.est_port}"

    @property
    def admin_url(self) -> str:
        return f"https://127.0.0.1:{self.handle.admin_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.handle.http_port}"

    @property
    def mqtt_port(self) -> int:
        port = self.handle.mqtt_port
        assert port is not None, "started without the broker"
        return port

    @property
    def admin_token(self) -> str:
        return self.layout.admin_token.read_text().strip()

    def metrics(self) -> str:
        """GET /metrics from the admin listener, with the admin token."""
        from tests.est_client import request

        headers = {"Authorization": f"Bearer {self.admin_token}"}
        reply = request(self.admin_url + "/metrics", self.client_ssl(), headers=headers)
        assert reply.status == 200, (reply.status, reply.text)
        return reply.text

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop (e.g. to reach the broker) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client_ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.layout.root_cert))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    def mint_device(
        self, device_id: str, ttl: timedelta = timedelta(days=7), batch_id: str | None = None
    ) -> str:
        """Register a device and give it a one-time token; returns the token."""
        now = datetime.now(UTC)
        did = DeviceId(device_id)
        self.registry.add_device(did, batch_id=batch_id, now=now, actor="test")
        token = new_secret()
        self.registry.add_token(did, hash_secret(token), now + ttl, now)
        return token

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.handle.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.registry.close()


def start_live_server(
    home: Path,
    *,
    registry_password: str | None = None,
    profile: DeviceProfile | None = None,
    clock: Callable[[], datetime] | None = None,
    broker: bool = False,
    cert_check_interval: float | None = None,
    provisioning: bool = True,
    **config: Any,
) -> LiveServer:
    layout = (
        make_home(home, registry_password=registry_password, **config)
        if not (home / "fleetpki.toml").exists()
        else HomeLayout(home)
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    thread = threading.Thread(
        target=lambda: (asyncio.set_event_loop(loop), started.set(), loop.run_forever()),
        name="fleetpki-live-server",
        daemon=True,
    )
    thread.start()
    started.wait(5)
    kwargs: dict[str, Any] = {
        "est_port": 0,
        "http_port": 0,
        "mqtt_port": 0,
        "admin_port": 0,
        "broker": broker,
        "profile": profile,
        "provisioner": Provisioning() if provisioning else None,
    }
    if clock is not None:
        kwargs["clock"] = clock
    if cert_check_interval is not None:
        kwargs["server_cert_check_interval"] = cert_check_interval
    fut = asyncio.run_coroutine_threadsafe(start_server(home, **kwargs), loop)
    try:
        handle = fut.result(30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        raise
    return LiveServer(layout, handle, loop, thread, Registry.open(registry_location(layout)))
