"""Device bundles: agent.toml rendering and writing DIR/<id>/{agent.toml, ca.pem, token}."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from enroll_server.home.config import ServerConfig
from fleetpki.identity import DeviceId

AGENT_TOML = "agent.toml"
CA_PEM = "ca.pem"
TOKEN_FILE = "token"
IDEVID_CERT = "idevid.pem"
IDEVID_KEY = "idevid.key"
STATE_DIR = "state"
FILE_MODE = 0o600
DIR_MODE = 0o700
# Device key types the agent knows (device_agent.keys.KeyType); checked here so that a typo is
# refused at the factory, not on 100,000 devices in the field.
DEVICE_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519")


def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes: \" \\ \n \uXXXX).
    return json.dumps(value, ensure_ascii=True)


def _toml_value(value: str | tuple[str, ...]) -> str:
    """A string, or an array of strings (a JSON array of strings is a TOML array too)."""
    return _toml_str(value) if isinstance(value, str) else json.dumps(list(value))


@dataclass(frozen=True, slots=True)
class BundleSettings:
    """What every agent.toml of a batch shares: where to enroll and where the broker is."""

    est_url: str
    mqtt_host: str
    mqtt_port: int
    key_type: str = "ec-p256"
    telemetry_interval: float = 30.0
    # Several nodes (`batch create --est-url ... --broker ...`, each repeatable): every EST
    # base URL and every "host:port" broker the agent may use; empty: the one above.
    est_urls: tuple[str, ...] = ()
    brokers: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse settings the agent would refuse: the agent's own parser reads a sample
        agent.toml (device_agent.config, the one place that rule lives). ConfigError."""
        from device_agent.config import parse_config

        sample = render_agent_toml(DeviceId("check"), self, idevid=False)
        parse_config(sample, Path("agent.toml"))

    @classmethod
    def from_config(cls, config: ServerConfig, key_type: str = "ec-p256") -> BundleSettings:
        return cls(
            est_url=config.est_url(),
            mqtt_host=config.public_host,
            mqtt_port=config.mqtt_port,
            key_type=key_type,
        )


def render_agent_toml(device_id: DeviceId, settings: BundleSettings, *, idevid: bool) -> str:
    """The agent configuration of one device; paths are relative to agent.toml's folder.

    Token bundles name `token_file`; IDevID bundles name the birth certificate and key instead
    (the agent then enrolls over mTLS with them and needs no token).
    """
    head, tail = _agent_toml_template(settings, idevid)
    # The id grammar ([A-Za-z0-9_-]) needs no TOML escaping, so it goes in as it is.
    return f"{head}{device_id.value}{tail}"


@functools.lru_cache(maxsize=16)
def _agent_toml_template(settings: BundleSettings, idevid: bool) -> tuple[str, str]:
    """agent.toml split around the device id: a batch renders the rest once, not N times."""
    if idevid:
        credentials = (
            f"idevid_cert = {_toml_str(IDEVID_CERT)}\nidevid_key = {_toml_str(IDEVID_KEY)}\n"
        )
    else:
        credentials = f"token_file = {_toml_str(TOKEN_FILE)}\n"
    head = '# fleetpki device bundle (written by `fleetpki batch create`).\n[device]\nid = "'
    tail = (
        '"\n'
        f"key_type = {_toml_str(settings.key_type)}\n"
        "\n[enroll]\n"
        f"server = {_toml_value(settings.est_urls or settings.est_url)}\n"
        f"{credentials}"
        f"trust_anchor = {_toml_str(CA_PEM)}\n"
        "\n[mqtt]\n"
        f"host = {_toml_str(settings.mqtt_host)}\n"
        f"port = {settings.mqtt_port}\n"
        + (f"brokers = {_toml_value(settings.brokers)}\n" if settings.brokers else "")
        + f"telemetry_interval = {settings.telemetry_interval!r}\n"
        "\n[state]\n"
        f"dir = {_toml_str(STATE_DIR)}\n"
    )
    return head, tail


def _umask_keeps_owner_bits() -> bool:
    """True if the umask leaves the owner's rwx alone (so open/mkdir modes come out exact)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask & 0o700 == 0


def _write_new(path: str, data: bytes, chmod: bool) -> None:
    # O_EXCL: a bundle file is always new (its folder was just made); never follow a planted
    # symlink. The mode given to open() can only lose bits to the umask, never gain any.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        if chmod:
            os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class BundleWriter:
    """Writes bundles into `root`: a folder per device, or one tar per device.

    No fsync per file: the caller makes the whole folder durable with one file-system sync
    before the registry commits the batch (see outdir.StagedOutput.sync). No chmod per file
    either when the umask cannot strip owner bits: each metadata call is a journal handle,
    and on a busy disk those, not bytes, are what 100,000 bundles cost.
    """

    def __init__(self, root: Path, *, tar: bool = False, mtime: float = 0.0) -> None:
        self.root = root
        self.tar = tar
        self.mtime = mtime
        self._root = os.fspath(root)
        self._chmod = not _umask_keeps_owner_bits()

    def write(self, device_id: DeviceId, files: Mapping[str, bytes]) -> str:
        """Write one device's files; returns the bundle's path relative to `root`."""
        name = device_id.value  # DeviceId grammar: no '/', no leading '.', so a safe name
        if self.tar:
            rel = f"{name}.tar"
            _write_new(os.path.join(self._root, rel), self._tar_bytes(name, files), self._chmod)
            return rel
        folder = os.path.join(self._root, name)
        os.mkdir(folder, DIR_MODE)
        if self._chmod:
            os.chmod(folder, DIR_MODE)
        for filename, data in files.items():
            _write_new(os.path.join(folder, filename), data, self._chmod)
        return name

    def _tar_bytes(self, name: str, files: Mapping[str, bytes]) -> bytes:
        buf = io.BytesIO()
        # USTAR, numeric owner 0: the factory station extracts as whichever user flashes.
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            folder = tarfile.TarInfo(name)
            folder.type = tarfile.DIRTYPE
            folder.mode = DIR_MODE
            folder.mtime = self.mtime
            tar.addfile(folder)
            for filename, data in files.items():
                info = tarfile.TarInfo(f"{name}/{filename}")
                info.size = len(data)
                info.mode = FILE_MODE
                info.mtime = self.mtime
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()
