"""Throwaway RabbitMQ nodes on loopback for the tests (Debian's rabbitmq-server 3.10).

Root runs the package's own script (/usr/lib/rabbitmq/bin/rabbitmq-server; the wrapper on
PATH switches user and drops the environment) with every RABBITMQ_* path inside a temporary
folder, HOME there too (the Erlang cookie, shared by the server and the CLI tools) and a
private epmd port, so nothing outside the folder is touched and epmd can be stopped after.
The CLI tools bind DIST_PORT+10000..+10010: dist ports are chosen so those stay free.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
BOOT_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dist_port() -> int:
    """A port P free together with P+10000..P+10010 (what rabbitmqctl binds)."""
    for _ in range(50):
        port = free_port()
        if port + 10010 > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, *range(port + 10000, port + 10011)):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise AssertionError("no free distribution port range")


@dataclass
class RabbitNode:
    """One node: its folder, ports and process. `start()` blocks until MQTT and management
    listen (at most BOOT_TIMEOUT s); `stop()` ends it and its epmd."""

    folder: Path
    conf_dir: Path
    name: str
    mqtt_port: int
    management_port: int
    epmd_port: int
    dist: int = field(default_factory=dist_port)
    proc: subprocess.Popen[bytes] | None = None
    conf_file: Path | None = None  # default: conf_dir/rabbitmq.conf

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.folder / f"{self.name}.pid"

    def env(self) -> dict[str, str]:
        base = self.folder / self.name
        return {
            **os.environ,
            "HOME": str(self.folder),  # the cookie: one per cluster folder
            "ERL_EPMD_PORT": str(self.epmd_port),
            # loopback only: epmd and the Erlang distribution listen on every interface else
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(self.pidfile),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.conf_file or self.conf_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.conf_dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.conf_dir / "enabled_plugins"),
        }

    def start(self) -> None:
        self.launch()
        self.wait()

    def launch(self) -> None:
        cookie = self.folder / ".erlang.cookie"
        if not cookie.exists():  # one cookie for every node of the folder, before any starts
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [str(SERVER)], env=self.env(), stdout=sink, stderr=sink, start_new_session=True
            )

    def wait(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.node} exited:\n{self.log_text()[-3000:]}")
            if self._listening(self.mqtt_port) and self._management_up():
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.node} did not start within {BOOT_TIMEOUT:g} s")

    def _listening(self, port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _management_up(self) -> bool:
        url = f"http://127.0.0.1:{self.management_port}/api/overview"
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, and asking for credentials
        except OSError:
            return False
        return True

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(CTL), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        out = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out}"
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def beam_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def signal(self, signum: int) -> None:
        """Send `signum` to beam.smp (by its pid file) and to the script's process group."""
        beam = self.beam_pid()
        if beam is not None and _alive(beam):
            with contextlib.suppress(ProcessLookupError):
                os.kill(beam, signum)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def stop(self, *, kill: bool = False) -> None:
        """End the node: SIGTERM (SIGKILL with `kill`, or after 20 s), and wait for it."""
        beam = self.beam_pid()
        self.signal(signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            (beam is not None and _alive(beam))
            or (self.proc is not None and self.proc.poll() is None)
        ):
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(5)
        self.proc = None
        self.pidfile.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours is gone for our purpose
    with contextlib.suppress(OSError):
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    return False


def configure(home: Path, out: Path, mqtt_port: int, management_port: int, admin_port: int) -> None:
    """`fleetpki broker rabbitmq-config` for a test node: loopback ports, fleetpki's admin
    listener at `admin_port`, files kept by root (the tests' account)."""
    from typer.testing import CliRunner

    from enroll_server.broker.rabbitmq_cli import app

    argv = [
        "rabbitmq-config",
        *("--home", str(home), "--out", str(out), "--port", str(mqtt_port)),
        *("--management-port", str(management_port), "--user", "root"),
        *("--auth-url", f"https://localhost:{admin_port}"),
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output


def stop_epmd(epmd_port: int) -> None:
    """epmd outlives the nodes; ours listens on a private port, so only ours is asked. It
    refuses while a node it knows is still registered (a killed node's is dropped a moment
    later): asked again for up to 10 s."""
    env = {**os.environ, "ERL_EPMD_PORT": str(epmd_port)}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        subprocess.run(["epmd", "-kill"], env=env, capture_output=True, timeout=10, check=False)
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", epmd_port)) != 0:
                return
        time.sleep(0.1)
