"""RabbitMQ's configuration folder: rabbitmq.conf, advanced.config, plugins, TLS files, the CRL.

What RabbitMQ 3.10.8 does with it (each point tested in tests/integration/test_rabbitmq.py):
- the MQTT plugin's TLS listener with `mqtt.ssl_cert_login` logs a client in as its
  certificate's CN (`ssl_cert_login_from = common_name`), asking the auth backends with no
  password; a username/password in the CONNECT would win over the certificate, which is why
  the only backend is fleetpki's (broker.rabbitmq_auth refuses every device password) and no
  internal user is consulted (`guest` stays in the internal database, which is never asked).
- `rabbitmq_auth_backend_cache` in front of the HTTP backend: one connect costs two HTTP
  calls and every new topic one more; answers are kept CACHE_TTL_MS. A revoked device's
  reconnect is refused at the TLS handshake by the CRL anyway, whatever the cache holds.
- the CRL: `crl_check` with `ssl_crl_hash_dir` reads `<issuer hash>.r0` (PEM) at each
  handshake, so a new file is used without a restart; with the file missing every client is
  refused, so it is only ever replaced atomically (write_crl).
- the management plugin (loopback only) is how rabbitmq-sync drops a live session.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from enroll_server.broker.mosquitto_config import BrokerMaterial, _broker_account
from enroll_server.broker.rabbitmq_auth_routes import auth_url
from fleetpki.atomic_file import PUBLIC_MODE, SECRET_MODE, write_atomic

PLUGINS = (
    "rabbitmq_mqtt",
    "rabbitmq_auth_backend_http",
    "rabbitmq_auth_backend_cache",
    "rabbitmq_management",
)
DEFAULT_MANAGEMENT_PORT = 15672
CACHE_TTL_MS = 5000


class RabbitConfigError(Exception):
    """The configuration folder cannot be written or read as rabbitmq-config wrote it."""


@dataclass(frozen=True, slots=True)
class RabbitFiles:
    """Every file of one RabbitMQ configuration folder."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "rabbitmq.conf"

    @property
    def advanced(self) -> Path:
        return self.folder / "advanced.config"

    @property
    def plugins(self) -> Path:
        return self.folder / "enabled_plugins"

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
    def crl_dir(self) -> Path:
        return self.folder / "crl"

    @property
    def settings(self) -> Path:
        return self.folder / "fleetpki-rabbitmq.json"

    @property
    def sync_cursor(self) -> Path:
        """The last registry event seq whose sessions rabbitmq-sync has dropped."""
        return self.folder / "fleetpki-sync.seq"


@dataclass(frozen=True, slots=True)
class RabbitSettings:
    """Choices of `rabbitmq-config`. Listeners bind to loopback unless told otherwise."""

    port: int = 8883
    bind: str = "127.0.0.1"
    management_port: int = DEFAULT_MANAGEMENT_PORT  # always loopback
    auth_url: str = "https://localhost:8444"  # fleetpki serve's admin listener
    user: str | None = "rabbitmq"  # whom to hand the folder to when written by root

    def __post_init__(self) -> None:
        parts = urlsplit(self.auth_url)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise RabbitConfigError(
                f"auth URL {self.auth_url!r} is not https://HOST:PORT (fleetpki serve's admin "
                "listener; RabbitMQ verifies its certificate against our CA)"
            )
        for name, port in (("port", self.port), ("management port", self.management_port)):
            if not 1 <= port <= 65535:
                raise RabbitConfigError(f"{name} {port} is not in 1..65535")

    @property
    def auth_host(self) -> str:
        host = urlsplit(self.auth_url).hostname
        assert host is not None  # __post_init__
        return host

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "port": self.port,
                    "bind": self.bind,
                    "management_port": self.management_port,
                    "auth_url": self.auth_url,
                    "user": self.user,
                },
                indent=1,
            )
            + "\n"
        )

    @classmethod
    def load(cls, files: RabbitFiles) -> RabbitSettings:
        try:
            data: dict[str, Any] = json.loads(files.settings.read_text())
            user = data["user"]
            return cls(
                port=int(data["port"]),
                bind=str(data["bind"]),
                management_port=int(data["management_port"]),
                auth_url=str(data["auth_url"]),
                user=None if user is None else str(user),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RabbitConfigError(
                f"{files.settings}: unreadable ({exc}); rerun rabbitmq-config"
            ) from exc


# Erlang ssl's `hibernate_after` for the MQTT listener's TLS connections, in ms.
HIBERNATE_AFTER_MS = 5000


def erlang_string(value: str) -> str:
    """An Erlang string literal (advanced.config is Erlang terms)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_conf(settings: RabbitSettings, auth_base: str) -> str:
    """rabbitmq.conf (new-style, RabbitMQ 3.10): MQTT over TLS only, certificate login,
    every question to fleetpki through the cache, management on loopback."""
    return "\n".join(
        [
            "# Written by `fleetpki broker rabbitmq-config`; rerun it rather than editing.",
            "# `fleetpki broker rabbitmq-sync` keeps the CRL current and drops revoked sessions.",
            "listeners.tcp = none",
            "mqtt.listeners.tcp = none",
            f"mqtt.listeners.ssl.default = {settings.bind}:{settings.port}",
            "mqtt.ssl_cert_login = true",
            "ssl_cert_login_from = common_name",
            "mqtt.allow_anonymous = false",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "loopback_users = none",
            "auth_backends.1 = cache",
            "auth_cache.cached_backend = http",
            f"auth_cache.cache_ttl = {CACHE_TTL_MS}",
            "auth_http.http_method = post",
            f"auth_http.user_path = {auth_base}/user",
            f"auth_http.vhost_path = {auth_base}/vhost",
            f"auth_http.resource_path = {auth_base}/resource",
            f"auth_http.topic_path = {auth_base}/topic",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {settings.management_port}",
            "log.console = true",
            "log.file = false",
            "",
        ]
    )


def render_advanced(files: RabbitFiles, auth_host: str) -> str:
    """advanced.config: the TLS options of the MQTT listener (rabbit.ssl_options) with the
    CRL check, and the HTTP backend's verification of fleetpki's admin listener."""
    s = erlang_string
    return f"""%% Written by `fleetpki broker rabbitmq-config`; rerun it rather than editing.
[
 {{rabbit, [
   {{ssl_options, [
     {{cacertfile, {s(str(files.cafile))}}},
     {{certfile, {s(str(files.certfile))}}},
     {{keyfile, {s(str(files.keyfile))}}},
     {{verify, verify_peer}},
     {{fail_if_no_peer_cert, true}},
     {{versions, ['tlsv1.3', 'tlsv1.2']}},
     %% the device's certificate against our issuing CA's CRL (RFC 5280 6.3); a missing
     %% CRL file refuses every client, so rabbitmq-sync only ever replaces it atomically
     {{crl_check, peer}},
     {{crl_cache, {{ssl_crl_hash_dir, {{internal, [{{dir, {s(str(files.crl_dir))}}}]}}}}}},
     %% an idle device's TLS connection process hibernates (a full garbage collection): its
     %% heap keeps the peak of the handshake otherwise (BENCHMARKS.md, "MQTT brokers")
     {{hibernate_after, {HIBERNATE_AFTER_MS}}}
   ]}}
 ]}},
 {{rabbitmq_auth_backend_http, [
   {{ssl_options, [
     {{verify, verify_peer}},
     {{cacertfile, {s(str(files.cafile))}}},
     {{server_name_indication, {s(auth_host)}}}
   ]}}
 ]}}
].
"""


def render_plugins() -> str:
    return "[" + ",".join(PLUGINS) + "].\n"


def crl_hash(crl_pem: bytes) -> str:
    """OpenSSL's issuer name hash of a CRL (what ssl_crl_hash_dir looks up: `<hash>.r0`)."""
    try:
        done = subprocess.run(
            ["openssl", "crl", "-hash", "-noout"],
            input=crl_pem,
            capture_output=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RabbitConfigError(f"openssl could not hash the CRL issuer: {exc}") from exc
    return done.stdout.decode().strip()


_CRL_END = b"-----END X509 CRL-----"


def write_crl(files: RabbitFiles, crl_pem: bytes) -> list[Path]:
    """Replace `crl/<hash>.r0` atomically for each CRL in `crl_pem` (one per live issuing CA
    after a rollover: ssl_crl_hash_dir finds a certificate's CRL by its issuer's name hash,
    and with crl_check peer a certificate whose issuer has none is refused): RabbitMQ never
    reads half a CRL nor finds none."""
    pems = [
        part.strip() + b"\n" + _CRL_END + b"\n" for part in crl_pem.split(_CRL_END) if part.strip()
    ]
    for pem in pems:
        x509.load_pem_x509_crl(pem)  # never write what is not a CRL
    files.crl_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pem in pems:
        path = files.crl_dir / f"{crl_hash(pem)}.r0"
        write_atomic(path, pem, PUBLIC_MODE)
        paths.append(path)
    return paths


def write_rabbitmq_config(
    out: Path, material: BrokerMaterial, settings: RabbitSettings, auth_secret: str, event_seq: int
) -> RabbitFiles:
    """Write a complete configuration folder. rabbitmq.conf and advanced.config name the
    auth secret, so they are 0600 like the key (handed to `settings.user` when root)."""
    out = out.absolute()
    files = RabbitFiles(out)
    out.mkdir(parents=True, exist_ok=True)
    host = settings.auth_host
    write_atomic(files.cafile, material.ca_chain_pem, PUBLIC_MODE)
    write_atomic(files.certfile, material.server_chain_pem, PUBLIC_MODE)
    write_atomic(files.keyfile, material.server_key_pem, SECRET_MODE)
    write_crl(files, material.crl_pem)
    base = auth_url(settings.auth_url, auth_secret)
    write_atomic(files.conf, render_conf(settings, base).encode(), SECRET_MODE)
    write_atomic(files.advanced, render_advanced(files, host).encode(), SECRET_MODE)
    write_atomic(files.plugins, render_plugins().encode(), PUBLIC_MODE)
    write_atomic(files.settings, settings.to_json().encode(), PUBLIC_MODE)
    write_atomic(files.sync_cursor, f"{event_seq}\n".encode(), PUBLIC_MODE)
    account = _broker_account(settings.user)
    if account is not None:
        for path in (out, files.keyfile, files.conf, files.advanced):
            os.chown(path, *account)
    return files
