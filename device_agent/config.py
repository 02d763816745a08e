"""agent.toml: load and validate the device agent's configuration into an AgentConfig."""

from __future__ import annotations

import hashlib
import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from device_agent.errors import ConfigError
from device_agent.keys import KeyType
from fleetpki.identity import DeviceId, InvalidIdentifier

log = logging.getLogger("fleetpki.agent")

SUSPENDED_RETRY_MAX_S = 600.0

# Keys each section knows; anything else is logged (not fatal) so that a newer factory can add
# keys without bricking older agents.
_KNOWN: dict[str, set[str]] = {
    "device": {"id", "key_type"},
    "enroll": {
        "server",
        "token_file",
        "idevid_cert",
        "idevid_key",
        "trust_anchor",
        "timeout",
        "suspended_retry_max",
    },
    "mqtt": {"host", "port", "brokers", "telemetry_interval", "keepalive", "queue_size"},
    "state": {"dir"},
}


@dataclass(frozen=True, slots=True)
class EstServer:
    """The EST base URL split into what a socket needs; paths live under /.well-known/est/."""

    url: str
    host: str
    port: int
    path_prefix: str

    def path(self, operation: str) -> str:
        # RFC 7030 3.2.2: operations sit under /.well-known/est/ below the base path.
        return f"{self.path_prefix}/.well-known/est/{operation}"

    @property
    def device_status_path(self) -> str:
        # Not an EST operation (RFC 7030 has none for status), so outside /.well-known/est/.
        return f"{self.path_prefix}/device/status"


@dataclass(frozen=True, slots=True)
class BirthCredentials:
    """The factory birth certificate (IDevID, IEEE 802.1AR) and its key, by path.

    The device's permanent factory identity: it authenticates the first enrollment (EST
    simpleenroll over mutual TLS instead of a token) and any later re-bootstrap, and is never
    presented to the broker. The agent never writes or deletes these files.
    """

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent reads from agent.toml; relative paths already resolved."""

    path: Path
    device_id: DeviceId
    key_type: KeyType
    server: EstServer
    token_file: Path
    trust_anchor: Path
    mqtt_host: str
    mqtt_port: int
    telemetry_interval: float
    state_dir: Path
    mqtt_keepalive: int = 30
    queue_size: int = 1000
    http_timeout: float = 30.0
    # The longest wait between two checks of a suspended device (seconds): it asks the
    # service again after 30 s, doubling up to this, so a resumed device is back within it.
    suspended_retry_max: float = SUSPENDED_RETRY_MAX_S
    # Set for bundles of `fleetpki batch create --idevid`: bootstrap with the birth
    # certificate; `token_file` is then only a default path that is never read.
    idevid: BirthCredentials | None = None
    # Several nodes (`enroll.server` as a list, `mqtt.brokers`): every one the bundle names;
    # empty when it names one. Use est_servers / mqtt_brokers, which apply the device's order.
    servers: tuple[EstServer, ...] = ()
    brokers: tuple[tuple[str, int], ...] = ()

    @property
    def est_servers(self) -> tuple[EstServer, ...]:
        """The EST servers in this device's order (spread): the first is tried first."""
        return spread(self.servers or (self.server,), str(self.device_id), lambda s: s.url)

    @property
    def mqtt_brokers(self) -> tuple[tuple[str, int], ...]:
        """The brokers in this device's order (spread): the first is tried first."""
        return spread(
            self.brokers or ((self.mqtt_host, self.mqtt_port),),
            str(self.device_id),
            lambda b: f"{b[0]}:{b[1]}",
        )


T = TypeVar("T")


def spread(items: tuple[T, ...], device_id: str, key: Callable[[T], str]) -> tuple[T, ...]:
    """`items` in an order fixed for this device and different across devices (a hash of the
    device id and each item), so a fleet spreads over the nodes and each device keeps going
    back to the same one first."""
    return tuple(
        sorted(items, key=lambda i: hashlib.sha256(f"{device_id}|{key(i)}".encode()).digest())
    )


def _section(path: Path, doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    if value is None:
        raise ConfigError(path, name, "section is missing")
    if not isinstance(value, dict):
        raise ConfigError(path, name, "must be a table")
    for key in value:
        if key not in _KNOWN[name]:
            log.warning("%s: [%s] %s: unknown key ignored", path, name, key)
    return value


def _get(
    path: Path, sec: dict[str, Any], section: str, key: str, kind: type, default: Any = None
) -> Any:
    full = f"{section}.{key}"
    if key not in sec:
        if default is not None:
            return default
        raise ConfigError(path, full, "is missing")
    value = sec[key]
    # TOML has distinct int and float; an int is fine where a float is wanted (30 vs 30.0).
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(
            path, full, f"must be a {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, str) and not value.strip():
        raise ConfigError(path, full, "must not be empty")
    return value


def _server(path: Path, url: str) -> EstServer:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced '[' or ']' ("Invalid IPv6 URL")
        raise ConfigError(path, "enroll.server", f"is not a URL ({exc}): {url!r}") from exc
    if parts.scheme != "https":
        raise ConfigError(path, "enroll.server", f"must be an https:// URL, got {url!r}")
    if not parts.hostname:
        raise ConfigError(path, "enroll.server", f"has no host name: {url!r}")
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(
            path, "enroll.server", f"must be a plain base URL (no user, query or fragment): {url!r}"
        )
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise ConfigError(path, "enroll.server", f"bad port in {url!r}") from exc
    return EstServer(url=url, host=parts.hostname, port=port, path_prefix=parts.path.rstrip("/"))


def _servers(path: Path, enroll: dict[str, Any]) -> tuple[EstServer, ...]:
    """`enroll.server`: one https:// base URL, or a list of them (several nodes)."""
    value = enroll.get("server")
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(path, "enroll.server", "must be a URL or a non-empty list of URLs")
        return tuple(_server(path, v) for v in value)
    return (_server(path, _get(path, enroll, "enroll", "server", str)),)


def _brokers(path: Path, mqtt: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """`mqtt.brokers`: a list of "host:port" ("[::1]:8883" for an IPv6 address; port 8883 by
    default); empty when absent (then mqtt.host and mqtt.port name the one broker)."""
    value = mqtt.get("brokers")
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "mqtt.brokers", 'must be a non-empty list of "host:port"')
    found = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(path, "mqtt.brokers", f'entries are "host:port" strings: {item!r}')
        try:
            parts = urlsplit(f"mqtts://{item.strip()}")
            host = parts.hostname
            port = 8883 if parts.port is None else parts.port
        except ValueError as exc:
            raise ConfigError(path, "mqtt.brokers", f"bad entry {item!r} ({exc})") from exc
        if not host or parts.path or parts.query or parts.username:
            raise ConfigError(path, "mqtt.brokers", f'bad entry {item!r}: "host:port" only')
        found.append((host, _port(path, "mqtt.brokers", port)))
    return tuple(found)


def _port(path: Path, key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(path, key, f"must be a port number 1..65535, got {value}")
    return value


def _birth_credentials(path: Path, enroll: dict[str, Any]) -> BirthCredentials | None:
    """`idevid_cert` + `idevid_key`, or neither; never together with `token_file`."""
    given = [k for k in ("idevid_cert", "idevid_key") if k in enroll]
    if not given:
        return None
    if "token_file" in enroll:
        raise ConfigError(
            path,
            "enroll.token_file",
            "give either a token file or an IDevID (idevid_cert + idevid_key), not both",
        )
    if len(given) == 1:
        missing = "idevid_key" if given[0] == "idevid_cert" else "idevid_cert"
        raise ConfigError(
            path, f"enroll.{missing}", f"is missing (enroll.{given[0]} needs its pair)"
        )
    base = path.parent
    return BirthCredentials(
        cert=base / _get(path, enroll, "enroll", "idevid_cert", str),
        key=base / _get(path, enroll, "enroll", "idevid_key", str),
    )


def parse_config(text: str, path: Path) -> AgentConfig:
    """Validate agent.toml's text; `path` names the file in errors and anchors relative paths."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from exc
    for name in doc:
        if name not in _KNOWN:
            log.warning("%s: unknown section [%s] ignored", path, name)
    base = path.parent
    device = _section(path, doc, "device")
    enroll = _section(path, doc, "enroll")
    mqtt = _section(path, doc, "mqtt")
    state = doc.get("state", {})
    if not isinstance(state, dict):
        raise ConfigError(path, "state", "must be a table")

    raw_id = _get(path, device, "device", "id", str)
    try:
        device_id = DeviceId(raw_id)
    except InvalidIdentifier as exc:
        raise ConfigError(path, "device.id", exc.why + f" ({raw_id!r})") from exc
    raw_kt = _get(path, device, "device", "key_type", str, default="ec-p256")
    try:
        key_type = KeyType(raw_kt)
    except ValueError as exc:
        allowed = ", ".join(k.value for k in KeyType)
        raise ConfigError(path, "device.key_type", f"{raw_kt!r} is not one of {allowed}") from exc

    interval = _get(path, mqtt, "mqtt", "telemetry_interval", float, default=30.0)
    if not interval > 0:
        raise ConfigError(path, "mqtt.telemetry_interval", f"must be > 0 seconds, got {interval}")
    keepalive = _get(path, mqtt, "mqtt", "keepalive", int, default=30)
    if not 5 <= keepalive <= 65535:
        raise ConfigError(path, "mqtt.keepalive", f"must be 5..65535 seconds, got {keepalive}")
    queue_size = _get(path, mqtt, "mqtt", "queue_size", int, default=1000)
    if queue_size < 1:
        raise ConfigError(path, "mqtt.queue_size", f"must be >= 1, got {queue_size}")
    timeout = _get(path, enroll, "enroll", "timeout", float, default=30.0)
    if not timeout > 0:
        raise ConfigError(path, "enroll.timeout", f"must be > 0 seconds, got {timeout}")
    suspended_max = _get(
        path, enroll, "enroll", "suspended_retry_max", float, default=SUSPENDED_RETRY_MAX_S
    )
    if not 1 <= suspended_max <= 86400:
        raise ConfigError(
            path,
            "enroll.suspended_retry_max",
            f"must be 1..86400 seconds, got {suspended_max}",
        )

    servers = _servers(path, enroll)
    brokers = _brokers(path, mqtt)
    return AgentConfig(
        path=path,
        device_id=device_id,
        key_type=key_type,
        server=servers[0],
        servers=servers if len(servers) > 1 else (),
        token_file=base / _get(path, enroll, "enroll", "token_file", str, default="token"),
        trust_anchor=base / _get(path, enroll, "enroll", "trust_anchor", str, default="ca.pem"),
        mqtt_host=brokers[0][0] if brokers else _get(path, mqtt, "mqtt", "host", str),
        mqtt_port=(
            brokers[0][1]
            if brokers
            else _port(path, "mqtt.port", _get(path, mqtt, "mqtt", "port", int, default=8883))
        ),
        brokers=brokers if len(brokers) > 1 else (),
        telemetry_interval=interval,
        state_dir=base / _get(path, state, "state", "dir", str, default="state"),
        mqtt_keepalive=keepalive,
        queue_size=queue_size,
        http_timeout=timeout,
        suspended_retry_max=suspended_max,
        idevid=_birth_credentials(path, enroll),
    )


def load_config(path: Path) -> AgentConfig:
    """Read and validate agent.toml (relative paths in it are relative to its folder).

    An IDevID pair is checked here too (readable, key matches certificate): a bundle that
    cannot bootstrap should say so at the first start, naming the file, not at the first
    enrollment attempt.
    """
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(path, None, "file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, f"cannot read: {exc}") from exc
    config = parse_config(text, path)
    if config.idevid is not None:
        from device_agent.idevid import check_birth_credentials

        check_birth_credentials(config.idevid, path)
    return config
