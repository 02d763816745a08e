"""mosquitto as a relying party: its configuration, its CRL file, and ending revoked sessions.

What mosquitto 2.0.11 does (each point tested in tests/integration/test_revocation_mosquitto.py):
- it reads `crlfile` at start and again on SIGHUP; after the reload, a revoked certificate is
  refused at the TLS handshake. A client that is already connected stays connected, and so
  does one whose handshake was already under way when the reload happened (seen in tests).
- the dynamic-security plugin's `deleteClient` / `disableClient` commands kick every
  connected client whose *username* matches - and with `use_identity_as_username` the
  username of a device is its certificate CN, i.e. its device id. So the syncer creates a
  throw-away dynsec client named after the device and deletes it again: the device's live
  session ends, and its reconnect fails against the reloaded CRL. Because of handshakes in
  flight during the reload, the kick is repeated a little later (RECHECK_DELAYS).
- with `use_identity_as_username` mosquitto never asks dynsec to check a password, so the
  plugin authenticates nobody on the device listener; device ACLs stay in `acl_file`.
- `use_username_as_clientid` is a *listener* option in 2.0.11 (the man page lists it as
  general; placed before any `listener` it silently creates a default listener on 1883).
  Inside the device listener it forces client id = CN, so no device can take over
  another's session by reusing its client id.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import pwd
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from enroll_server.broker.hardening.tls import AEAD_CIPHERS
from enroll_server.broker.mosquitto_acl import render_acl
from enroll_server.registry.models import EventKind
from enroll_server.revocation_http import CrlPublisher
from enroll_server.server_certificate import ServerCertificateError, read_pair
from fleetpki.atomic_file import PUBLIC_MODE, SECRET_MODE, write_atomic
from fleetpki.packet_size import DEFAULT_MAX_PACKET_SIZE, check_max_packet_size

log = logging.getLogger("fleetpki.mosquitto")

# ':' is not allowed in a device id (fleetpki.identity) nor in a DNS name, so no certificate
# our CA issues can carry this CN and claim the dynsec admin role on the device listener.
SYNC_USERNAME = "fleetpki:sync"
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC = DYNSEC_TOPIC + "/response"
DEFAULT_ADMIN_PORT = 1884
DEFAULT_SYNC_INTERVAL = 0.2
# mosquitto handles SIGHUP on its next loop turn; kicking before that lets a reconnect in.
RELOAD_SETTLE = 0.05
# A TLS handshake already under way at the reload is checked against the old CRL; kicking the
# same names again a little later ends sessions that slipped through that way.
RECHECK_DELAYS = (1.0, 5.0)
# The admin password is 256 random bits: key stretching adds nothing, and every admin login
# costs mosquitto's single thread the whole PBKDF2 run.
DYNSEC_ITERATIONS = 1000
# Commands per dynsec control message (two per device); keeps messages well under 1 MB.
KICK_CHUNK = 500
# Bytes of one kick command in a control message at most (a 64-character id, a 32-character
# password and correlation data): fewer commands per message under a small max_packet_size,
# which mosquitto applies to the control listener too.
KICK_COMMAND_BYTES = 256
# How often mosquitto-sync re-reads the service identities for the ACL (issue/revoke of a
# service records no registry event; the list is short).
SERVICE_ACL_INTERVAL = 2.0
PLUGIN_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto_dynamic_security.so"),
    Path("/usr/local/lib/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto/mosquitto_dynamic_security.so"),
)


class MosquittoError(Exception):
    """Base of the errors raised while configuring or syncing mosquitto."""


class MosquittoNotRunning(MosquittoError):
    """No mosquitto process to signal: the pid (file) is missing or stale."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"cannot signal mosquitto ({what}): {why}")
        self.what = what
        self.why = why


class DynsecUnavailable(MosquittoError):
    """The dynamic-security control channel cannot be reached or does not answer."""

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(f"mosquitto dynsec control at {host}:{port}: {why}")
        self.host = host
        self.port = port
        self.why = why


class DynsecCommandFailed(MosquittoError):
    """A dynsec command that mosquitto answered with an error."""

    def __init__(self, command: str, username: str, error: str) -> None:
        super().__init__(f"dynsec {command} {username!r} failed: {error}")
        self.command = command
        self.username = username
        self.error = error


class PluginNotFound(MosquittoError):
    """mosquitto_dynamic_security.so is not where packages install it."""

    def __init__(self, searched: Sequence[Path]) -> None:
        places = ", ".join(str(p) for p in searched)
        super().__init__(
            f"mosquitto_dynamic_security.so not found (looked in {places}); pass --plugin, "
            "or --no-live-drop to rely on the CRL alone"
        )
        self.searched = tuple(searched)


def find_dynsec_plugin() -> Path:
    for path in PLUGIN_CANDIDATES:
        if path.is_file():
            return path
    raise PluginNotFound(PLUGIN_CANDIDATES)


@dataclass(frozen=True, slots=True)
class MosquittoFiles:
    """Every file of one mosquitto configuration folder."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.folder / "acl"

    @property
    def cafile(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def certfile(self) -> Path:
        return self.folder / "server.pem"

    @property
    def keyfile(self) -> Path:
        return self.folder / "server.key"

    @property
    def crlfile(self) -> Path:
        return self.folder / "crl.pem"

    @property
    def dynsec(self) -> Path:
        return self.folder / "dynamic-security.json"

    @property
    def pidfile(self) -> Path:
        return self.folder / "mosquitto.pid"

    @property
    def sync_secret(self) -> Path:
        """The dynsec admin password of mosquitto-sync (0600, never in the conf)."""
        return self.folder / "sync.secret"

    @property
    def sync_settings(self) -> Path:
        """What mosquitto-sync needs to know about this configuration (JSON)."""
        return self.folder / "fleetpki-sync.json"

    @property
    def sync_cursor(self) -> Path:
        """The last registry event seq whose sessions the syncer has dropped."""
        return self.folder / "fleetpki-sync.seq"


@dataclass(frozen=True, slots=True)
class MosquittoSettings:
    """Choices of `mosquitto-config`; the defaults suit a Debian/Ubuntu mosquitto package.

    `bind` defaults to loopback, as `fleetpki serve` does: serving a LAN is a choice
    (`--bind 0.0.0.0` or the address of one interface).
    """

    port: int = 8883
    bind: str = "127.0.0.1"
    admin_port: int = DEFAULT_ADMIN_PORT  # loopback only
    user: str | None = "mosquitto"  # whom mosquitto runs as when started by root
    plugin: Path | None = None  # None: no dynsec plugin, so no live drop (CRL only)
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    log_types: tuple[str, ...] = ("error", "warning", "notice", "information")

    @property
    def live_drop(self) -> bool:
        return self.plugin is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "bind": self.bind,
            "admin_port": self.admin_port,
            "user": self.user,
            "plugin": None if self.plugin is None else str(self.plugin),
            "max_packet_size": self.max_packet_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MosquittoSettings:
        """The settings an earlier mosquitto-config saved (ValueError/KeyError/TypeError if
        they are not what it writes)."""
        plugin = data["plugin"]
        user = data["user"]
        return cls(
            port=int(data["port"]),
            bind=str(data["bind"]),
            admin_port=int(data["admin_port"]),
            user=None if user is None else str(user),
            plugin=None if plugin is None else Path(plugin),
            max_packet_size=check_max_packet_size(int(data["max_packet_size"])),
        )


def render_conf(files: MosquittoFiles, settings: MosquittoSettings) -> str:
    """mosquitto.conf for mosquitto 2.0: a device listener (mTLS + CRL) and, with live drop,
    a loopback control listener for the dynamic-security plugin."""
    lines = [
        "# Written by `fleetpki broker mosquitto-config`; rerun it rather than editing.",
        "# `fleetpki broker mosquitto-sync` keeps crl.pem current and drops revoked sessions.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {files.acl}",
        f"pid_file {files.pidfile}",
        "persistence false",
        "set_tcp_nodelay true",
        # A client sending a larger packet is disconnected before its payload is read.
        f"max_packet_size {settings.max_packet_size}",
        "log_dest stderr",
        *(f"log_type {t}" for t in settings.log_types),
    ]
    if settings.user is not None:
        lines.append(f"user {settings.user}")
    if settings.plugin is not None:
        lines += [
            f"plugin {settings.plugin}",
            f"plugin_opt_config_file {files.dynsec}",
        ]
    lines += [
        "",
        "# Devices: mutual TLS; the client certificate's CN becomes the MQTT username.",
        f"listener {settings.port} {settings.bind}",
        # TLS 1.2 at least, AEAD suites with forward secrecy only: the embedded broker's list.
        "tls_version tlsv1.2",
        f"ciphers {AEAD_CIPHERS}",
        f"cafile {files.cafile}",
        f"certfile {files.certfile}",
        f"keyfile {files.keyfile}",
        f"crlfile {files.crlfile}",
        "require_certificate true",
        "use_identity_as_username true",
        # client id := username (the CN): one device cannot take over another's session.
        "use_username_as_clientid true",
    ]
    if settings.plugin is not None:
        lines += [
            "",
            "# Control channel of the dynamic-security plugin, for mosquitto-sync only.",
            f"listener {settings.admin_port} 127.0.0.1",
        ]
    return "\n".join(lines) + "\n"


def dynsec_password_hash(password: str, salt: bytes, iterations: int) -> str:
    """What dynsec stores: base64 of PBKDF2-HMAC-SHA512 (as mosquitto_ctrl writes it)."""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return base64.b64encode(digest).decode()


def dynsec_document(
    password: str, salt: bytes, iterations: int = DYNSEC_ITERATIONS
) -> dict[str, Any]:
    """The dynamic-security plugin's configuration: only the syncer's admin client.

    The admin role may use the control topic and nothing else. The default ACL access is what
    `mosquitto_ctrl dynsec init` writes; device traffic is decided by acl_file first.
    """
    return {
        "clients": [
            {
                "username": SYNC_USERNAME,
                "textName": "fleetpki mosquitto-sync",
                "password": dynsec_password_hash(password, salt, iterations),
                "salt": base64.b64encode(salt).decode(),
                "iterations": iterations,
                "roles": [{"rolename": "fleetpki-sync"}],
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": "fleetpki-sync",
                "acls": [
                    {"acltype": "publishClientSend", "topic": DYNSEC_TOPIC, "allow": True},
                    {
                        "acltype": "publishClientReceive",
                        "topic": DYNSEC_RESPONSE_TOPIC,
                        "allow": True,
                    },
                    {"acltype": "subscribePattern", "topic": DYNSEC_RESPONSE_TOPIC, "allow": True},
                ],
            }
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


@dataclass(frozen=True, slots=True)
class BrokerMaterial:
    """The PEM files mosquitto needs, taken from the fleetpki home."""

    ca_chain_pem: bytes  # issuing + root: verifies device certificates
    server_chain_pem: bytes  # server certificate + issuing CA
    server_key_pem: bytes
    crl_pem: bytes


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """fleetpki-sync.json: what mosquitto-sync needs, and the settings mosquitto-config used
    (a rerun keeps them unless told otherwise)."""

    admin_port: int
    live_drop: bool
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    config: MosquittoSettings | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "admin_port": self.admin_port,
            "live_drop": self.live_drop,
            "max_packet_size": self.max_packet_size,
        }
        if self.config is not None:
            data["config"] = self.config.to_dict()
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def load(cls, files: MosquittoFiles) -> SyncSettings:
        try:
            data = json.loads(files.sync_settings.read_text())
            config = data.get("config")
            return cls(
                admin_port=int(data["admin_port"]),
                live_drop=bool(data["live_drop"]),
                max_packet_size=int(data.get("max_packet_size", DEFAULT_MAX_PACKET_SIZE)),
                config=None if config is None else MosquittoSettings.from_dict(config),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MosquittoError(
                f"{files.sync_settings}: unreadable ({exc}); rerun mosquitto-config"
            ) from exc


def _broker_account(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) to hand the folder and private files to, when we are root and mosquitto
    will drop to `user`: mosquitto 2.0.11 drops privileges *before* it reads
    cafile/keyfile/crlfile and writes pid_file (tested: "Unable to write pid file" else)."""
    if user is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def write_mosquitto_config(
    out: Path,
    material: BrokerMaterial,
    settings: MosquittoSettings,
    event_seq: int,
    services: Iterable[str] = (),
) -> MosquittoFiles:
    """Write a complete configuration folder; keeps the sync password of an earlier run.

    `event_seq` is where mosquitto-sync starts dropping sessions: nothing before it matters,
    since a mosquitto started from this folder loads a CRL that already lists it.
    `services`: the service identities the ACL names (mosquitto-sync keeps it current).
    Every path written into mosquitto.conf is absolute (mosquitto may start elsewhere).
    """
    out = out.absolute()
    files = MosquittoFiles(out)
    out.mkdir(parents=True, exist_ok=True)
    # mosquitto drops privileges before reading its files: its user must reach the folder.
    os.chmod(out, 0o755)  # noqa: S103
    write_atomic(files.cafile, material.ca_chain_pem, PUBLIC_MODE)
    write_atomic(files.certfile, material.server_chain_pem, PUBLIC_MODE)
    write_atomic(files.keyfile, material.server_key_pem, SECRET_MODE)
    write_atomic(files.crlfile, material.crl_pem, PUBLIC_MODE)
    write_atomic(files.acl, render_acl(services).encode(), PUBLIC_MODE)
    write_atomic(files.conf, render_conf(files, settings).encode(), PUBLIC_MODE)
    if settings.live_drop:
        password = (
            files.sync_secret.read_text().strip() if files.sync_secret.exists() else ""
        ) or secrets.token_urlsafe(32)
        write_atomic(files.sync_secret, password.encode() + b"\n", SECRET_MODE)
        document = dynsec_document(password, os.urandom(12))
        write_atomic(files.dynsec, json.dumps(document, indent=1).encode(), SECRET_MODE)
    sync = SyncSettings(settings.admin_port, settings.live_drop, settings.max_packet_size, settings)
    write_atomic(files.sync_settings, sync.to_json().encode(), PUBLIC_MODE)
    write_atomic(files.sync_cursor, f"{event_seq}\n".encode(), PUBLIC_MODE)
    account = _broker_account(settings.user)
    if account is not None:
        # Once it has dropped to its user, mosquitto must still write its pid file and
        # rewrite the dynsec file here, and read its key: hand those to the broker's user.
        for path in (out, files.keyfile, files.dynsec):
            if path.exists():
                os.chown(path, *account)
    return files


def write_crl(files: MosquittoFiles, crl_pem: bytes) -> None:
    """Replace crl.pem atomically: mosquitto never reads half a CRL."""
    write_atomic(files.crlfile, crl_pem, PUBLIC_MODE)


def read_pid(pidfile: Path) -> int:
    try:
        text = pidfile.read_text().strip()
    except OSError as exc:
        raise MosquittoNotRunning(str(pidfile), f"pid file unreadable: {exc}") from exc
    try:
        return int(text)
    except ValueError as exc:
        raise MosquittoNotRunning(str(pidfile), f"not a pid: {text[:20]!r}") from exc


def signal_reload(pid: int) -> None:
    """SIGHUP: mosquitto re-reads its configuration, crlfile included."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise MosquittoNotRunning(f"pid {pid}", "no such process") from exc
    except PermissionError as exc:
        raise MosquittoNotRunning(f"pid {pid}", "not allowed to signal it") from exc


def read_cursor(files: MosquittoFiles) -> int | None:
    try:
        return int(files.sync_cursor.read_text().strip())
    except (OSError, ValueError):
        return None


def save_cursor(files: MosquittoFiles, seq: int) -> None:
    write_atomic(files.sync_cursor, f"{seq}\n".encode(), PUBLIC_MODE)


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    responses: list[dict[str, Any]] = field(default_factory=list)


class DynsecControl:
    """A client of the dynamic-security control topic on mosquitto's loopback listener."""

    def __init__(
        self,
        password: str,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 5.0,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        self._chunk = max(1, min(KICK_CHUNK, (max_packet_size - 512) // KICK_COMMAND_BYTES))
        self._host = host
        self._port = port
        self._timeout = timeout
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fleetpki-sync-{os.getpid()}",
            protocol=mqtt.MQTTv311,
        )
        self._client.username_pw_set(SYNC_USERNAME, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._connect_error: str | None = None
        self._started = False

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            self._connected.set()
            return
        self._connect_error = None
        client.subscribe(DYNSEC_RESPONSE_TOPIC, qos=1)
        self._connected.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unparseable dynsec response on %s", message.topic)
            return
        with self._lock:
            for response in responses:
                pending = self._pending.get(str(response.get("correlationData")))
                if pending is not None:
                    pending.responses.append(response)
                    pending.done.set()

    def connect(self) -> None:
        """Connect once (idempotent); later, paho's loop thread reconnects by itself."""
        if not self._started:
            try:
                self._client.connect(self._host, self._port, keepalive=30)
            except OSError as exc:
                raise DynsecUnavailable(self._host, self._port, str(exc)) from exc
            self._client.loop_start()
            self._started = True
        self._wait_ready()

    def _wait_ready(self) -> None:
        if not self._connected.wait(self._timeout):
            raise DynsecUnavailable(self._host, self._port, "no CONNACK")
        if self._connect_error is not None:
            raise DynsecUnavailable(self._host, self._port, f"refused: {self._connect_error}")
        if not self._subscribed.wait(self._timeout):
            raise DynsecUnavailable(self._host, self._port, "no SUBACK for the response topic")

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    def __enter__(self) -> DynsecControl:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one control message; their responses, in order."""
        self.connect()
        tags = [uuid.uuid4().hex for _ in commands]
        waits = [_Pending() for _ in commands]
        with self._lock:
            self._pending.update(zip(tags, waits, strict=True))
        try:
            body = [dict(c, correlationData=t) for c, t in zip(commands, tags, strict=True)]
            info = self._client.publish(DYNSEC_TOPIC, json.dumps({"commands": body}), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DynsecUnavailable(self._host, self._port, f"publish failed ({info.rc})")
            for wait in waits:
                if not wait.done.wait(self._timeout):
                    raise DynsecUnavailable(self._host, self._port, "no response to a command")
            return [w.responses[0] for w in waits]
        finally:
            with self._lock:
                for tag in tags:
                    self._pending.pop(tag, None)

    def kick(self, usernames: Sequence[str]) -> list[str]:
        """End the live sessions of `usernames`; returns those that were dynsec clients before
        (left disabled: revocation outranks a hand-made dynsec account of the same name)."""
        kept_disabled: list[str] = []
        names = [u for u in dict.fromkeys(usernames) if u != SYNC_USERNAME]
        for start in range(0, len(names), self._chunk):
            chunk = names[start : start + self._chunk]
            created = self.run(
                [
                    {
                        "command": "createClient",
                        "username": name,
                        # Never used to log in; random so the throw-away client is never open.
                        "password": secrets.token_urlsafe(24),
                    }
                    for name in chunk
                ]
            )
            second: list[dict[str, Any]] = []
            for name, response in zip(chunk, created, strict=True):
                error = response.get("error")
                if error is None:
                    # deleteClient kicks every session with this username, then forgets it.
                    second.append({"command": "deleteClient", "username": name})
                elif "exist" in str(error).lower():
                    second.append({"command": "disableClient", "username": name})
                    kept_disabled.append(name)
                else:
                    raise DynsecCommandFailed("createClient", name, str(error))
            for command, response in zip(second, self.run(second), strict=True):
                if response.get("error") is not None:
                    raise DynsecCommandFailed(
                        command["command"], command["username"], str(response["error"])
                    )
        return kept_disabled


@dataclass(frozen=True, slots=True)
class SyncRound:
    """What one sync round did."""

    crl_number: int | None  # the CRL written and reloaded this round, if any
    dropped: tuple[str, ...]  # device ids whose sessions were ended
    server_serial: int | None = None  # a renewed TLS server certificate handed over, if any


class MosquittoSync:
    """Keeps one mosquitto current: CRL file + SIGHUP on change, then drops revoked sessions.

    The order matters: the CRL is reloaded *before* a session is dropped, so the device's
    immediate reconnect is already refused at the handshake.

    `server_pair` (the home's tls/server.pem and server.key): mosquitto reads copies in its
    own folder; a renewed pair (`fleetpki serve` renews it at 2/3 of its lifetime) is copied
    there, key first, and mosquitto re-reads certfile and keyfile on the same SIGHUP as the
    CRL (mosquitto.conf(5)). A pair whose key does not match is never copied.
    """

    def __init__(
        self,
        publisher: CrlPublisher,
        files: MosquittoFiles,
        pid: Callable[[], int],
        control: DynsecControl | None,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        server_pair: tuple[Path, Path] | None = None,
        services: Callable[[], Iterable[str]] | None = None,
        acl_interval: float = SERVICE_ACL_INTERVAL,
    ) -> None:
        self._server_pair = server_pair
        self._services = services
        self._acl_interval = acl_interval
        self._acl_checked: float | None = None
        self._publisher = publisher
        self._files = files
        self._pid = pid
        self._control = control
        self._clock = clock
        self._monotonic = monotonic
        self._applied_crl: int | None = None
        self._to_drop: dict[str, None] = {}
        self._rechecks: list[tuple[float, str]] = []  # (due, device id)

    @property
    def rechecks_pending(self) -> int:
        return len(self._rechecks)

    def step(self) -> SyncRound:
        update = self._publisher.poll(self._clock())
        if self._control is not None:
            self._to_drop.update(dict.fromkeys(update.devices_to_drop()))
            resumed = {e.device_id.value for e in update.events if e.kind is EventKind.RESUMED}
            self._rechecks = [(due, d) for due, d in self._rechecks if d not in resumed]
        current = self._publisher.current
        applied = None
        server_serial = self._copy_server_pair()
        crl_changed = current is not None and current.number != self._applied_crl
        if crl_changed:
            assert current is not None
            write_crl(self._files, current.pem)
        acl_services = self._refresh_acl()
        if crl_changed or server_serial is not None or acl_services is not None:
            signal_reload(self._pid())
            if acl_services is not None:
                log.info("mosquitto: ACL with %d service identities loaded", acl_services)
            if current is not None and crl_changed:
                self._applied_crl = applied = current.number
                log.info("mosquitto: CRL #%d (%d entries) loaded", current.number, current.entries)
            if server_serial is not None:
                log.info("mosquitto: TLS server certificate serial %x loaded", server_serial)
            time.sleep(RELOAD_SETTLE)
        now = self._monotonic()
        due = [d for when, d in self._rechecks if when <= now]
        self._rechecks = [(when, d) for when, d in self._rechecks if when > now]
        dropped: tuple[str, ...] = ()
        if self._control is not None and (self._to_drop or due):
            fresh = tuple(self._to_drop)
            kept = self._control.kick([*fresh, *due])
            self._to_drop.clear()
            self._rechecks += [(now + delay, d) for delay in RECHECK_DELAYS for d in fresh]
            dropped = fresh
            if fresh:
                log.info("mosquitto: dropped sessions of %s", ", ".join(fresh))
            if kept:
                log.warning("mosquitto: dynsec clients %s left disabled", ", ".join(kept))
        if not self._to_drop:
            save_cursor(self._files, self._publisher.event_seq)
        return SyncRound(applied, dropped, server_serial)

    def _refresh_acl(self) -> int | None:
        """Rewrite the ACL if the service identities changed; their count if it did.

        Read every `acl_interval` seconds: issuing or revoking a service records no event.
        """
        if self._services is None:
            return None
        now = self._monotonic()
        if self._acl_checked is not None and now - self._acl_checked < self._acl_interval:
            return None
        self._acl_checked = now
        names = sorted(set(self._services()))
        text = render_acl(names).encode()
        with contextlib.suppress(OSError):
            if self._files.acl.read_bytes() == text:
                return None
        write_atomic(self._files.acl, text, PUBLIC_MODE)
        return len(names)

    def _copy_server_pair(self) -> int | None:
        """Copy a changed, matching server pair into mosquitto's folder; its serial if so."""
        if self._server_pair is None:
            return None
        try:
            chain_pem, key_pem, leaf = read_pair(*self._server_pair)
        except ServerCertificateError as exc:
            log.warning("mosquitto: TLS server certificate not handed over: %s", exc)
            return None
        files = self._files
        with contextlib.suppress(OSError):
            if files.certfile.read_bytes() == chain_pem and files.keyfile.read_bytes() == key_pem:
                return None
        try:
            owner = files.keyfile.stat()
        except OSError:
            owner = None
        write_atomic(files.keyfile, key_pem, SECRET_MODE)
        if owner is not None and os.geteuid() == 0:
            # mosquitto may have dropped to its own account: it must still read its key.
            os.chown(files.keyfile, owner.st_uid, owner.st_gid)
        write_atomic(files.certfile, chain_pem, PUBLIC_MODE)
        return leaf.serial_number

    def finish(self, max_wait: float) -> None:
        """Run the rechecks due within `max_wait` seconds (for one-shot runs), drop the rest."""
        limit = self._monotonic() + max_wait
        while any(when <= limit for when, _ in self._rechecks):
            nearest = min(when for when, _ in self._rechecks)
            time.sleep(max(0.0, nearest - self._monotonic()))
            self.step()
            self._rechecks = [(w, d) for w, d in self._rechecks if w <= limit]
        self._rechecks.clear()

    def run(self, interval: float, stop: threading.Event) -> None:
        """Sync every `interval` seconds until `stop` is set; failures are logged and retried."""
        while not stop.is_set():
            try:
                self.step()
            except MosquittoError as exc:
                log.warning("mosquitto sync round failed, retrying: %s", exc)
            stop.wait(interval)


class ServiceLister(Protocol):
    def list_devices(
        self, *, role: str | None = None, limit: int = 1000, offset: int = 0
    ) -> Sequence[Any]: ...


def service_names(registry: ServiceLister, page: int = 1000) -> list[str]:
    """The registry's service identities that may still connect (any state but revoked)."""
    names: list[str] = []
    offset = 0
    while True:
        rows = registry.list_devices(role="service", limit=page, offset=offset)
        names += [str(d.device_id) for d in rows if str(d.state) != "revoked"]
        if len(rows) < page:
            return names
        offset += page


def open_control(files: MosquittoFiles, timeout: float = 5.0) -> DynsecControl | None:
    """A DynsecControl (connecting on first use) if this configuration has live drop."""
    settings = SyncSettings.load(files)
    if not settings.live_drop:
        return None
    try:
        password = files.sync_secret.read_text().strip()
    except OSError as exc:
        raise MosquittoError(f"{files.sync_secret}: unreadable ({exc})") from exc
    return DynsecControl(
        password, settings.admin_port, timeout=timeout, max_packet_size=settings.max_packet_size
    )


def close_quietly(control: DynsecControl | None) -> None:
    if control is not None:
        with contextlib.suppress(Exception):
            control.close()
