"""The server configuration `H/fleetpki.toml`: reading, validating and writing it."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from enroll_server.pki.ca import PkiUrls
from enroll_server.pki.ca_expiry import DEFAULT_EXPIRY_WARNING
from enroll_server.pki.keys import KeyType
from enroll_server.pki.signer import BadKeyUri, parse_pkcs11_uri
from enroll_server.registry.errors import InvalidValue
from enroll_server.registry.location import has_password, parse_location, redact
from fleetpki.duration import InvalidDuration, format_duration, parse_duration
from fleetpki.packet_size import DEFAULT_MAX_PACKET_SIZE, check_max_packet_size

# Where the root CA's CRL is served on the plain-HTTP listener (the issuing CA's CDP).
ROOT_CRL_PATH = "root.crl"
# Where the root CA lives: "home" (H/ca/root.key), "offline" (a folder on removable media,
# `init --root-offline`), "external" (the operator's own PKI, `init --external-root`).
ROOT_PLACES = ("home", "offline", "external")


class ConfigError(ValueError):
    """A configuration value that is missing or wrong; names the file and the key."""

    def __init__(self, path: Path, key: str, why: str) -> None:
        super().__init__(f"{path}: [{key}] {why}")
        self.path = path
        self.key = key
        self.why = why


@dataclass(frozen=True, slots=True)
class ServerConfig:
    key_type: KeyType = KeyType.EC_P256
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    # The host name devices use to reach us; it goes into CDP/AIA URLs and bundles.
    public_host: str = "localhost"
    bind: str = "127.0.0.1"
    est_port: int = 8443
    http_port: int = 8080
    mqtt_port: int = 8883
    # The admin API and /metrics: a listener of their own, on loopback unless said otherwise.
    admin_bind: str = "127.0.0.1"
    admin_port: int = 8444
    device_validity: timedelta = timedelta(days=30)
    backdate: timedelta = timedelta(minutes=5)
    token_ttl: timedelta = timedelta(days=7)
    crl_next_update: timedelta = timedelta(hours=24)
    # `fleetpki serve` warns (log, metric) from this long before the issuing CA expires.
    ca_expiry_warning: timedelta = DEFAULT_EXPIRY_WARNING
    # Where the root CA is (ROOT_PLACES); an offline root's CRL: serve warns from this long
    # before its nextUpdate (a ceremony must sign the next one).
    root: str = "home"
    root_crl_warning: timedelta = timedelta(days=30)
    # Largest MQTT packet a client may send, in bytes (embedded broker and mosquitto alike).
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    # Connection limits of every listener (enroll_server/transport/connection_limits.py).
    head_timeout: timedelta = timedelta(seconds=10)
    idle_timeout: timedelta = timedelta(seconds=30)
    max_per_source: int = 64
    cap_loopback: bool = False
    # Top-level `registry`: a PostgreSQL URL shared by several nodes ("" = H/registry.db),
    # never with a password in it; `registry_password_file` (relative to the home) holds one.
    registry: str = ""
    registry_password_file: str = ""
    # The issuing CA key in a PKCS#11 token (RFC 7512 URI, "" = the encrypted key file), the
    # module that reaches it ("" = $FLEETPKI_PKCS11_MODULE or SoftHSM2's) and a file holding
    # the PIN ("" = $FLEETPKI_PKCS11_PIN); never the PIN itself.
    ca_key: str = ""
    pkcs11_module: str = ""
    pkcs11_pin_file: str = ""
    # The root CA key in a PKCS#11 token (`init --root-key`; root = "home": the home uses it,
    # but holds no root.key); the same module and PIN sources as `ca_key`.
    root_key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def urls(self) -> PkiUrls:
        base = f"http://{_url_host(self.public_host)}:{self.http_port}"
        return PkiUrls(
            crl=f"{base}/crl",
            ocsp=f"{base}/ocsp",
            ca_issuers=f"{base}/issuing-ca.der",
            root_crl=f"{base}/{ROOT_CRL_PATH}",
        )

    def est_url(self) -> str:
        return f"https://{_url_host(self.public_host)}:{self.est_port}"

    def with_ports(self, est_port: int, http_port: int, mqtt_port: int) -> ServerConfig:
        return replace(self, est_port=est_port, http_port=http_port, mqtt_port=mqtt_port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _get(data: dict[str, Any], path: Path, section: str, key: str, kind: type, default: Any) -> Any:
    value = data.get(section, {}).get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            path, f"{section}.{key}", f"must be of type {kind.__name__}, got {value!r}"
        )
    return value


def _duration(data: dict[str, Any], path: Path, section: str, key: str, default: str) -> timedelta:
    raw = _get(data, path, section, key, str, default)
    try:
        return parse_duration(raw)
    except InvalidDuration as exc:
        raise ConfigError(path, f"{section}.{key}", str(exc)) from exc


def _port(data: dict[str, Any], path: Path, key: str, default: int) -> int:
    value: int = _get(data, path, "server", key, int, default)
    if not 0 <= value <= 65535:
        raise ConfigError(path, f"server.{key}", f"port {value} is out of range 0..65535")
    return value


def _max_packet_size(data: dict[str, Any], path: Path) -> int:
    value: int = _get(data, path, "broker", "max_packet_size", int, DEFAULT_MAX_PACKET_SIZE)
    try:
        return check_max_packet_size(value)
    except ValueError as exc:
        raise ConfigError(path, "broker.max_packet_size", str(exc)) from exc


def _max_per_source(data: dict[str, Any], path: Path) -> int:
    value: int = _get(data, path, "connections", "max_per_source", int, 64)
    if value < 1:
        raise ConfigError(path, "connections.max_per_source", f"must be at least 1, got {value}")
    return value


def _registry(data: dict[str, Any], path: Path) -> tuple[str, str]:
    """The top-level `registry` and `registry_password_file` (strings, "" when absent)."""
    values = []
    for key in ("registry", "registry_password_file"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, got {type(value).__name__}")
        values.append(value)
    registry, password_file = values
    if has_password(registry):
        raise ConfigError(
            path,
            "registry",
            f"{redact(registry)} holds a password: fleetpki.toml never does; put it in "
            "registry_password_file, PGPASSWORD or libpq's ~/.pgpass",
        )
    try:
        parse_location(registry or "registry.db")
    except InvalidValue as exc:
        raise ConfigError(path, "registry", exc.why) from None
    return registry, password_file


def _seconds(delta: timedelta) -> str:
    """A duration for the config file, to the millisecond ('10s', '0.5s')."""
    return f"{round(delta.total_seconds(), 3):g}s"


def load_config(path: Path) -> ServerConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(path, "-", "file not found (run `fleetpki init` first)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from exc
    raw_kind = _get(data, path, "ca", "key_type", str, "ec-p256")
    try:
        key_type = KeyType(raw_kind)
    except ValueError as exc:
        raise ConfigError(path, "ca.key_type", f"unknown key type {raw_kind!r}") from exc
    hostnames = _get(data, path, "server", "hostnames", list, ["localhost", "127.0.0.1", "::1"])
    if not hostnames or not all(isinstance(h, str) and h for h in hostnames):
        raise ConfigError(path, "server.hostnames", "must be a non-empty list of host names")
    registry, password_file = _registry(data, path)
    root = _get(data, path, "ca", "root", str, "home")
    if root not in ROOT_PLACES:
        raise ConfigError(path, "ca.root", f"must be one of {', '.join(ROOT_PLACES)}, got {root!r}")
    ca_key = _token_uri(data, path, "key")
    root_key = _token_uri(data, path, "root_key")
    if root_key and root != "home":
        raise ConfigError(
            path, "ca.root_key", f'a root key in a token is a root = "home", not {root!r}'
        )
    return ServerConfig(
        key_type=key_type,
        hostnames=tuple(hostnames),
        public_host=_get(data, path, "server", "public_host", str, "localhost"),
        bind=_get(data, path, "server", "bind", str, "127.0.0.1"),
        est_port=_port(data, path, "est_port", 8443),
        http_port=_port(data, path, "http_port", 8080),
        mqtt_port=_port(data, path, "mqtt_port", 8883),
        admin_bind=_get(data, path, "server", "admin_bind", str, "127.0.0.1"),
        admin_port=_port(data, path, "admin_port", 8444),
        device_validity=_duration(data, path, "ca", "device_validity", "30d"),
        backdate=_duration(data, path, "ca", "backdate", "5m"),
        token_ttl=_duration(data, path, "enroll", "token_ttl", "7d"),
        crl_next_update=_duration(data, path, "crl", "next_update", "24h"),
        ca_expiry_warning=_duration(data, path, "ca", "expiry_warning", "180d"),
        root=root,
        root_crl_warning=_duration(data, path, "ca", "root_crl_warning", "30d"),
        max_packet_size=_max_packet_size(data, path),
        head_timeout=_duration(data, path, "connections", "head_timeout", "10s"),
        idle_timeout=_duration(data, path, "connections", "idle_timeout", "30s"),
        max_per_source=_max_per_source(data, path),
        cap_loopback=_get(data, path, "connections", "cap_loopback", bool, False),
        registry=registry,
        registry_password_file=password_file,
        ca_key=ca_key,
        pkcs11_module=_get(data, path, "ca", "pkcs11_module", str, ""),
        pkcs11_pin_file=_get(data, path, "ca", "pkcs11_pin_file", str, ""),
        root_key=root_key,
        extra=data,
    )


def _render_registry(cfg: ServerConfig) -> str:
    if not cfg.registry:
        return '# registry = "postgresql://fleetpki@db.example/fleetpki"   # default: registry.db\n'
    # json.dumps: a TOML basic string (quotes and backslashes escaped alike).
    lines = f"registry = {json.dumps(cfg.registry)}   # every node's; never a password here\n"
    if cfg.registry_password_file:
        lines += f"registry_password_file = {json.dumps(cfg.registry_password_file)}\n"
    return lines


def _token_uri(data: dict[str, Any], path: Path, key: str) -> str:
    """[ca] `key`: a PKCS#11 URI (RFC 7512), checked, or "" (a key file)."""
    uri = _get(data, path, "ca", key, str, "")
    if uri:
        try:
            parse_pkcs11_uri(uri)
        except BadKeyUri as exc:
            raise ConfigError(path, f"ca.{key}", exc.why) from None
    return uri


def _root_key_line(uri: str) -> str:
    return f"root_key = {json.dumps(uri)}   # the root CA key, in a PKCS#11 token"


def with_root_key(text: str, uri: str) -> str:
    """fleetpki.toml's `text` naming the root key `uri` instead (a root rollover in a token);
    the rest of the file as the operator left it. ValueError if it names no root key."""
    new, count = re.subn(r"(?m)^root_key\s*=.*$", lambda _: _root_key_line(uri), text, count=1)
    if count != 1:
        raise ValueError("no root_key line in [ca]")
    return new


def _ca_key_line(uri: str) -> str:
    return f"key = {json.dumps(uri)}   # the issuing CA key, in a PKCS#11 token"


def with_ca_key(text: str, uri: str) -> str:
    """fleetpki.toml's `text` naming the issuing CA key `uri` (an issuing rollover in a
    token): its [ca] `key` line replaced, or added after [ca]'s key_type line when the key was
    a file; the rest of the file as the operator left it. ValueError if neither is there."""
    new, count = re.subn(r"(?m)^key\s*=.*$", lambda _: _ca_key_line(uri), text, count=1)
    if count == 1:
        return new
    new, count = re.subn(
        r"(?m)^key_type\s*=.*$", lambda m: m.group(0) + "\n" + _ca_key_line(uri), text, count=1
    )
    if count != 1:
        raise ValueError("no key or key_type line in [ca]")
    return new


def _render_ca_key(cfg: ServerConfig) -> str:
    if not cfg.ca_key and not cfg.root_key:
        return ""
    lines = ""
    if cfg.ca_key:
        lines += _ca_key_line(cfg.ca_key) + "\n"
    if cfg.root_key:
        lines += _root_key_line(cfg.root_key) + "\n"
    lines += f"pkcs11_module = {json.dumps(cfg.pkcs11_module)}\n"
    if cfg.pkcs11_pin_file:
        lines += f"pkcs11_pin_file = {json.dumps(cfg.pkcs11_pin_file)}   # the PIN, never here\n"
    return lines


def _render_root(cfg: ServerConfig) -> str:
    if cfg.root == "home":
        return ""
    if cfg.root == "external":
        return 'root = "external"   # the operator\'s PKI: no root key, no root CRL of ours\n'
    return (
        'root = "offline"   # the root key is on removable media, not here\n'
        "# serve warns from this long before the root CRL's nextUpdate (sign the next one)\n"
        f'root_crl_warning = "{format_duration(cfg.root_crl_warning)}"\n'
    )


def render_config(cfg: ServerConfig) -> str:
    hosts = ", ".join(f'"{h}"' for h in cfg.hostnames)
    return f"""# fleetpki server configuration (written by `fleetpki init`).
{_render_registry(cfg)}
[ca]
key_type = "{cfg.key_type.value}"
device_validity = "{format_duration(cfg.device_validity)}"   # lifetime of device certificates
backdate = "{format_duration(cfg.backdate)}"   # notBefore in the past: devices without RTC
# serve warns (log, metric) from this long before the issuing CA itself expires
expiry_warning = "{format_duration(cfg.ca_expiry_warning)}"
{_render_root(cfg)}{_render_ca_key(cfg)}
[server]
hostnames = [{hosts}]
public_host = "{cfg.public_host}"   # the name devices use; goes into CRL/OCSP URLs and bundles
bind = "{cfg.bind}"   # 127.0.0.1: this machine only; "0.0.0.0" to serve devices on the network
est_port = {cfg.est_port}
http_port = {cfg.http_port}
mqtt_port = {cfg.mqtt_port}
admin_bind = "{cfg.admin_bind}"   # the admin API and /metrics (HTTPS, admin token)
admin_port = {cfg.admin_port}

[enroll]
token_ttl = "{format_duration(cfg.token_ttl)}"

[crl]
next_update = "{format_duration(cfg.crl_next_update)}"

[broker]
max_packet_size = {cfg.max_packet_size}   # bytes; a client sending a larger packet is disconnected

[connections]   # every listener: EST, CRL/OCSP, admin (the broker takes head_timeout)
# TLS handshake, and a request head from its first byte (the broker: TLS and CONNECT)
head_timeout = "{_seconds(cfg.head_timeout)}"
# no request in progress; a body that stops arriving; a reply the client does not read
idle_timeout = "{_seconds(cfg.idle_timeout)}"
# open connections per source address (IPv6: per /64), per listener
max_per_source = {cfg.max_per_source}
# true: loopback (this machine, a local reverse proxy) is capped too
cap_loopback = {"true" if cfg.cap_loopback else "false"}
"""
