"""manifest.csv: one row per device (id, bundle path, token expiry), never a secret."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TextIO

from enroll_server.registry import Registry
from fleetpki.identity import DeviceId

MANIFEST_NAME = "manifest.csv"
COLUMNS = ("device_id", "bundle", "token_expires_at")
EXPORT_COLUMNS = (*COLUMNS, "state")
_PAGE = 2000


def iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat().replace("+00:00", "Z")


class ManifestWriter:
    """Streams rows to `path` (0600) as bundles are written: memory stays flat with N."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        self._fh: TextIO = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._csv.writerow(COLUMNS)
        self.rows = 0
        # A batch shares one expiry: format it once, not per row.
        self._last: tuple[datetime | None, str] = (None, "")

    def row(self, device_id: DeviceId, bundle: str, token_expires_at: datetime | None) -> None:
        if token_expires_at != self._last[0]:
            self._last = (token_expires_at, iso(token_expires_at))
        self._csv.writerow((device_id.value, bundle, self._last[1]))
        self.rows += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def export_rows(registry: Registry, batch_id: str, *, tar: bool = False) -> Iterator[list[str]]:
    """The manifest of a batch rebuilt from the registry (plus each device's state), paged.

    The bundle path is where `batch create` put it, relative to the output folder.
    """
    yield list(EXPORT_COLUMNS)
    offset = 0
    while True:
        page = registry.list_devices(batch_id=batch_id, limit=_PAGE, offset=offset)
        for device in page:
            name = device.device_id.value
            yield [
                name,
                f"{name}.tar" if tar else name,
                iso(device.token_expires_at),
                device.state.value,
            ]
        if len(page) < _PAGE:
            return
        offset += len(page)
