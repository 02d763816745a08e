"""The stack under test: EST service + broker started in a temporary home, or a running one.

The self-hosted stack runs in its own thread and event loop, as `fleetpki serve` would in its
own process: thousands of agents busy in the simulator's loop then cannot starve the server's
accept loop or the broker's revocation watcher of turns, so the latencies we report are the
service's, not our scheduler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import socket
import ssl
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from enroll_server.enrollment.operators import set_admin_token
from enroll_server.home.config import ServerConfig, load_config
from enroll_server.home.layout import HomeError, HomeLayout, init_home
from enroll_server.pki.profile import DeviceProfile
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
from simulators.errors import PortInUse, ServerUnreachable, SimulatorError

if TYPE_CHECKING:
    from enroll_server.broker import RunningBroker
    from enroll_server.wiring.server import ServerHandle

T = TypeVar("T")
HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where devices reach the deployment: EST over HTTPS, CRL/OCSP over HTTP, MQTT over TLS."""

    host: str
    est_port: int
    http_port: int
    mqtt_port: int

    @property
    def est_url(self) -> str:
        return f"https://{self.host}:{self.est_port}"


@dataclass
class StackClock:
    """The service's and broker's 'now': the real time plus an offset the scenarios may move."""

    offset: timedelta = field(default_factory=timedelta)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass(frozen=True, slots=True)
class Ports:
    """Ports for the self-hosted stack; 0 = any free port."""

    est: int = 0
    http: int = 0
    mqtt: int = 0


def die_with_parent() -> None:
    """A child process's preexec_fn (Linux): SIGTERM when its parent dies (PR_SET_PDEATHSIG),
    so a killed simulator leaves no server, broker or fleet shard behind. The signal comes
    when the *thread* that started the child ends: start children from a thread that lives
    as long as they should."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_free(what: str, host: str, port: int) -> None:
    """Fail early, with the port named, rather than deep inside aiohttp or amqtt."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(what, host, port) from exc
            raise SimulatorError(f"cannot listen for {what} on {host}:{port}: {exc}") from exc


def init_temp_home(
    root: Path, ports: Ports, validity: timedelta, admin_port: int | None = None
) -> HomeLayout:
    """`fleetpki init` in-process, with the ports written into the config (and so into the
    CRL and OCSP URLs of every certificate). `admin_port` matters only to a `fleetpki serve`
    started on the home (the in-process stack picks its own): give one that is free, not the
    default 8444 another server on this machine may hold."""
    cfg = ServerConfig(
        hostnames=("localhost", HOST),
        public_host=HOST,
        bind=HOST,
        est_port=ports.est,
        http_port=ports.http,
        mqtt_port=ports.mqtt,
        # The scenario's device lifetime reaches the service as a DeviceProfile; the config
        # keeps a normal one, which backend identities (the telemetry observer) get.
        device_validity=max(validity, timedelta(days=30)),
    )
    if admin_port is not None:
        cfg = dataclasses.replace(cfg, admin_port=admin_port)
    now = datetime.now(UTC)
    result = init_home(root, cfg, now)
    with Registry.open(result.layout.registry) as registry:
        set_admin_token(registry, result.admin_token, now, actor="simulator")
    return result.layout


class ProfileOverrides:
    """Certificate lifetimes for chosen devices (the demo's one short-lived renewer): the
    service's `profile_for`, answering `default` for every device not named in `profiles`.

    Written from the simulator's thread, read in the stack's: one dict look-up per issuance,
    atomic under the GIL.
    """

    def __init__(self, default: DeviceProfile) -> None:
        self.default = default
        self.profiles: dict[str, DeviceProfile] = {}

    def __call__(self, device_id: DeviceId) -> DeviceProfile:
        return self.profiles.get(device_id.value, self.default)


class HostedStack:
    """Service (EST, admin API, CRL/OCSP) and embedded broker on 127.0.0.1 in a thread.

    Scenario controls (`stop_broker`, `start_broker`, `stop_est`, `start_est`) are coroutines
    for the simulator's loop; they run on the stack's loop and are awaited from ours.
    """

    def __init__(self, layout: HomeLayout, profile: DeviceProfile, clock: StackClock) -> None:
        self.layout = layout
        self.profile = profile
        self.clock = clock
        self.overrides = ProfileOverrides(profile)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="fleetpki-sim-stack", daemon=True
        )
        self._server: ServerHandle | None = None
        self._broker: RunningBroker | None = None
        self.endpoints = Endpoints(HOST, 0, 0, 0)
        self._closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    # -- lifecycle (blocking; call from a thread or before the simulator's loop runs) -------
    @classmethod
    def start(
        cls,
        root: Path,
        *,
        validity: timedelta,
        backdate: timedelta = timedelta(seconds=2),
        ports: Ports = Ports(),
        clock: StackClock | None = None,
    ) -> HostedStack:
        """Init a home in `root` (an empty folder) and start service and broker in it."""
        for what, port in (("EST", ports.est), ("CRL/OCSP", ports.http), ("MQTT", ports.mqtt)):
            if port:
                _check_free(what, HOST, port)
        chosen = Ports(
            ports.est or free_port(), ports.http or free_port(), ports.mqtt or free_port()
        )
        layout = init_temp_home(root, chosen, validity)
        stack = cls(
            layout, DeviceProfile(validity=validity, backdate=backdate), clock or StackClock()
        )
        stack._thread.start()
        try:
            stack._call(stack._start_all(chosen), 60)
        except BaseException:
            stack.close()
            raise
        return stack

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the stack's loop, awaited from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def _start_all(self, ports: Ports) -> None:
        from enroll_server.wiring.server import start_server
        from provisioning.admin import Provisioning

        try:
            self._server = await start_server(
                self.layout.root,
                est_port=ports.est,
                http_port=ports.http,
                admin_port=0,  # any free port: the console of `demo --keep-running` prints it
                bind=HOST,
                admin_bind=HOST,
                profile=self.profile,
                profile_for=self.overrides,
                clock=self.clock.now,
                # The console of `demo --keep-running` creates batches and tokens.
                provisioner=Provisioning(),
            )
        except OSError as exc:
            raise _port_error("EST or CRL/OCSP", ports.est, exc) from exc
        # Mirror `serve`: an admin-API revocation drops the live session in-process too.
        self._server.state.on_revocation.append(self._drop)
        broker = await self._start_broker(ports.mqtt)
        self._server.state.live_sessions = broker.sessions  # the console's "connected now"
        self.endpoints = Endpoints(HOST, self._server.est_port, self._server.http_port, broker.port)

    @property
    def console_url(self) -> str:
        """The web console (the admin listener's /console/; `fleetpki demo --keep-running`)."""
        assert self._server is not None, "the stack is not running"
        return f"https://{HOST}:{self._server.admin_port}/console/"

    def _drop(self, device_id: str, why: str) -> None:
        if self._broker is not None:
            self._broker.disconnect(device_id, reason=why)

    async def _start_broker(self, port: int) -> RunningBroker:
        from enroll_server.broker import BrokerConfig, BrokerStartError, start_broker

        config = BrokerConfig(
            server_cert=self.layout.server_cert,
            server_key=self.layout.server_key,
            ca_file=self.layout.chain,
            registry_path=self.layout.registry,
            host=HOST,
            port=port,
        )
        try:
            self._broker = broker = await start_broker(config, clock=self.clock.now)
        except BrokerStartError as exc:
            if "in use" in exc.why.lower() or "errno 98" in exc.why.lower():
                raise PortInUse("MQTT", HOST, port) from exc
            raise SimulatorError(str(exc)) from exc
        return broker

    async def _stop_all(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.stop()
            self._broker = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    def close(self) -> None:
        """Stop service and broker and the stack's thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._call(self._stop_all(), 30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        self.loop.close()

    # -- scenario controls (coroutines for the simulator's loop) -----------------------------
    async def stop_broker(self) -> None:
        async def stop() -> None:
            if self._broker is not None:
                await self._broker.stop()
                self._broker = None

        await self.call(stop())

    async def start_broker(self) -> None:
        await self.call(self._start_broker(self.endpoints.mqtt_port))

    async def stop_est(self) -> None:
        if self._server is not None:
            await self.call(self._server.stop_est())

    async def start_est(self) -> None:
        if self._server is not None:
            await self.call(self._server.start_est())

    async def broker_sessions(self) -> dict[str, int]:
        """Identity -> certificate serial of each live session, as the broker admitted it."""

        async def read() -> dict[str, int]:
            return {} if self._broker is None else self._broker.sessions()

        return await self.call(read())

    def short_lived(
        self, device_id: str, validity: timedelta, backdate: timedelta = timedelta(seconds=1)
    ) -> None:
        """Give `device_id` certificates of `validity` from now on (see ProfileOverrides)."""
        self.overrides.profiles[device_id] = DeviceProfile(validity=validity, backdate=backdate)


def _port_error(what: str, port: int, exc: OSError) -> SimulatorError:
    if exc.errno == errno.EADDRINUSE:
        return PortInUse(what, HOST, port)
    return SimulatorError(f"cannot start the {what} listener on {HOST}:{port}: {exc}")


def existing_endpoints(home: Path, ports: Ports = Ports()) -> tuple[HomeLayout, Endpoints]:
    """The endpoints a running `fleetpki serve --home` listens on: its fleetpki.toml, unless
    `ports` says otherwise (serve was started with --est-port/--mqtt-port)."""
    layout = HomeLayout(home)
    if not layout.config.exists():
        raise SimulatorError(
            str(HomeError(home, "not initialized: run `fleetpki init --home` first"))
        )
    cfg = load_config(layout.config)
    host = HOST if cfg.bind in ("0.0.0.0", "::", HOST) else cfg.bind
    return layout, Endpoints(
        host, ports.est or cfg.est_port, ports.http or cfg.http_port, ports.mqtt or cfg.mqtt_port
    )


async def probe_tls(what: str, host: str, port: int, trust_anchor: Path, within: float) -> None:
    """Check that a TLS server chaining to our trust anchor answers at host:port."""
    ctx = ssl.create_default_context(cafile=str(trust_anchor))
    ctx.check_hostname = False  # only reachability; the agents check names themselves
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port, ssl=ctx)
    except TimeoutError as exc:
        raise ServerUnreachable(what, f"{host}:{port}", f"no answer in {within:.0f} s") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnreachable(what, f"{host}:{port}", str(exc) or type(exc).__name__) from exc
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
