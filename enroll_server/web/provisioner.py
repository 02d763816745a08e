"""What the admin API asks of the operator tooling: a token batch, a device's new token.

The code that wires the server passes it in (`start_server(provisioner=...)`; `fleetpki serve`
passes `provisioning.admin.Provisioning`), so that enroll_server never imports provisioning:
provisioning imports enroll_server, never the reverse (tests/unit/test_import_direction.py).
A refusal arrives as a ServiceError (BadRequest, Conflict) carrying the tooling's message.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from enroll_server.home.layout import LoadedHome
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId

# rekey: every certificate of the device is cut off now; readmit: a revoked device returns.
TokenPurpose = Literal["rekey", "readmit"]


class CreatedBatch(Protocol):
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
    ) -> CreatedBatch:
        """A token batch held in memory only (its clear tokens in the result)."""
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
