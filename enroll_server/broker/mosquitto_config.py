"""mosquitto's configuration folder: mosquitto.conf, its files, the dynsec admin, the settings.

What mosquitto 2.0.11 does with it is listed in mosquitto_sync.py (each point tested in
tests/integration/test_revocation_mosquitto.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enroll_server.broker.mosquitto_acl import render_acl
from enroll_server.broker.mosquitto_errors import MosquittoError, PluginNotFound
from enroll_server.transport.tls_policy import AEAD_CIPHERS
from fleetpki.atomic_file import PUBLIC_MODE, SECRET_MODE, write_atomic
from fleetpki.packet_size import DEFAULT_MAX_PACKET_SIZE, check_max_packet_size

# ':' is not allowed in a device id (fleetpki.identity) nor in a DNS name, so no certificate
# our CA issues can carry this CN and claim the dynsec admin role on the device listener.
SYNC_USERNAME = "fleetpki:sync"
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC = DYNSEC_TOPIC + "/response"
DEFAULT_ADMIN_PORT = 1884
# The admin password is 256 random bits: key stretching adds nothing, and every admin login
# costs mosquitto's single thread the whole PBKDF2 run.
DYNSEC_ITERATIONS = 1000
PLUGIN_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto_dynamic_security.so"),
    Path("/usr/local/lib/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto/mosquitto_dynamic_security.so"),
)


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
