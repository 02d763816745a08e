"""What the admin API and the web console ask of the operator tooling: a token batch, a
device's new token, a batch's manifest.

The code that wires the server passes it in (`start_server(provisioner=...)`; `fleetpki serve`
passes `provisioning.admin.Provisioning`), so that enroll_server never imports provisioning:
provisioning imports enroll_server, never the reverse (tests/unit/test_import_direction.py).
A refusal arrives as a ServiceError (BadRequest, Conflict) carrying the tooling's message.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from enroll_server.home.layout import LoadedHome
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId

# reissue: a token besides its certificates (a lost bundle); rekey: every certificate of the
# device is cut off now; readmit: a revoked device returns.
TokenPurpose = Literal["reissue", "rekey", "readmit"]
TOKEN_PURPOSES: tuple[TokenPurpose, ...] = ("reissue", "rekey", "readmit")
# progress(phase, done, total), as provisioning reports a batch's creation.
Progress = Callable[[str, int, int], None]


class CreatedBatch(Protocol):
    @property
    def batch_id(self) -> str: ...

    @property
    def count(self) -> int: ...

    def to_json(self, *, include_tokens: bool = ...) -> dict[str, Any]: ...


class NewToken(Protocol):
    @property
    def token(self) -> str: ...

    @property
    def expires_at(self) -> datetime: ...

    @property
    def cut_off(self) -> tuple[int, ...]: ...


class Provisioner(Protocol):
    def create_batch(
        self,
        registry: Registry,
        home: LoadedHome,
        *,
        count: int,
        prefix: str,
        token_ttl: timedelta | None,
        now: datetime,
        actor: str,
        batch_id: str | None,
        note: str,
        out_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> CreatedBatch:
        """A token batch: its bundles and manifest written to `out_dir` (a new folder), or
        with None held in memory only (its clear tokens in the result)."""
        ...

    def new_token(
        self,
        registry: Registry,
        home: LoadedHome,
        device_id: DeviceId,
        *,
        purpose: TokenPurpose,
        ttl: timedelta | None,
        now: datetime,
        actor: str,
    ) -> NewToken:
        """A new one-time token for a device (its previous unused one dies at once)."""
        ...

    def export_manifest(self, registry: Registry, batch_id: str, out: TextIO) -> int:
        """The batch's manifest (CSV) with each device's state, as `fleetpki batch export`."""
        ...
