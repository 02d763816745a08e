"""The operator tooling as the admin API's and the console's Provisioner
(enroll_server.web.provisioner): token batches, new device tokens and manifests over HTTP,
their refusals as the service's errors (409, 400).

The code that wires the server passes `Provisioning()` in; enroll_server never imports this
package (tests/unit/test_import_direction.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from enroll_server.errors import BadRequest, Conflict
from enroll_server.home.layout import LoadedHome
from enroll_server.registry import Registry
from enroll_server.web.provisioner import TokenPurpose
from fleetpki.identity import DeviceId
from provisioning.batch import BatchResult, Progress, provision_batch
from provisioning.errors import DeviceIdTaken, ProvisioningError, ReissueRefused
from provisioning.lifecycle import ReissuedToken, export_manifest, reissue_token
from provisioning.lifecycle import TokenPurpose as Purpose


class Provisioning:
    """enroll_server.web.provisioner.Provisioner, by provisioning.batch and .lifecycle."""

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
    ) -> BatchResult:
        try:
            return provision_batch(
                registry,
                home.layout,
                home.config,
                count=count,
                prefix=prefix,
                token_ttl=token_ttl,
                now=now,
                actor=actor,
                batch_id=batch_id,
                note=note,
                out_dir=out_dir,
                progress=progress,
            )
        except DeviceIdTaken as exc:
            raise Conflict(str(exc)) from exc
        except ProvisioningError as exc:
            raise BadRequest(str(exc)) from exc

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
    ) -> ReissuedToken:
        try:
            return reissue_token(
                registry,
                home.layout,
                home.config,
                device_id,
                ttl=ttl,
                now=now,
                out_dir=None,
                purpose=Purpose(purpose),
                actor=actor,
            )
        except ReissueRefused as exc:
            raise Conflict(str(exc)) from exc
        except ProvisioningError as exc:
            raise BadRequest(str(exc)) from exc

    def export_manifest(self, registry: Registry, batch_id: str, out: TextIO) -> int:
        return export_manifest(registry, batch_id, out)
