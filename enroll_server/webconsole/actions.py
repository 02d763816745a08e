"""The console's actions (POST only, behind the gate: a session, its CSRF token, the admin
role). Each calls the one function the admin API calls too (operator_actions, identities,
the provisioner), with the operator as the audit log's actor, and translates its errors."""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import timedelta
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from enroll_server.enrollment.identities import ServiceIdentityError, issue_service_identity
from enroll_server.errors import ServiceError, http_status
from enroll_server.pki.errors import PkiError
from enroll_server.registry import (
    InvalidValue,
    RegistryError,
    Role,
    UnknownBatch,
    UnknownDevice,
)
from enroll_server.web.operator_actions import (
    Transition,
    change_device_state,
    create_token_batch,
    new_device_token,
    provisioning,
)
from enroll_server.web.operator_actions import revoke_batch as revoke_whole_batch
from enroll_server.web.provisioner import TOKEN_PURPOSES
from enroll_server.webconsole.context import (
    BATCH_JOBS,
    CONSOLE_PREFIX,
    DOWNLOADS,
    current,
    state,
)
from enroll_server.webconsole.downloads import CHUNK, DownloadGone
from enroll_server.webconsole.jobs import BatchJob
from enroll_server.webconsole.pages import (
    device_id_of,
    render_batch,
    render_batches,
    render_device,
    render_services,
)
from fleetpki.duration import InvalidDuration, parse_duration
from fleetpki.identity import DeviceId, InvalidIdentifier

log = logging.getLogger("fleetpki.console")

# Batches made from the console: the bundles are one tar download, built on this server.
MAX_CONSOLE_BATCH = 100_000
_tasks: set[asyncio.Task[None]] = set()


def _form_text(form: Any, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def _actor(request: web.Request) -> str:
    return current(request)[1].actor


async def device_transition(request: web.Request) -> web.StreamResponse:
    device_id = device_id_of(request)
    action = Transition(request.match_info["action"])
    form = await request.post()
    try:
        await change_device_state(
            state(request),
            device_id,
            action,
            reason=_form_text(form, "reason") or "unspecified",
            actor=_actor(request),
        )
    except UnknownDevice as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc
    except InvalidValue as exc:
        return await render_device(request, device_id, error=str(exc), status=400)
    raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/devices/{device_id.value}")


def _ttl(text: str) -> timedelta | None:
    return parse_duration(text) if text else None


async def device_token(request: web.Request) -> web.StreamResponse:
    """A new one-time enrollment token, shown in this response only (never again)."""
    device_id = device_id_of(request)
    form = await request.post()
    try:
        purpose = _form_text(form, "purpose") or "reissue"
        if purpose not in TOKEN_PURPOSES:
            raise InvalidValue("purpose", purpose, " or ".join(TOKEN_PURPOSES))
        result = await new_device_token(
            state(request),
            device_id,
            purpose,
            ttl=_ttl(_form_text(form, "token_ttl")),
            actor=_actor(request),
        )
    except UnknownDevice as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc
    except ServiceError as exc:  # the tooling's refusal (a re-key of a revoked device: 409)
        return await render_device(request, device_id, error=exc.reason, status=http_status(exc))
    except (InvalidDuration, InvalidValue) as exc:
        return await render_device(request, device_id, error=str(exc), status=400)
    return await render_device(
        request, device_id, message=f"new {purpose} token issued", token=result
    )


async def create_batch(request: web.Request) -> web.StreamResponse:
    """Start creating a batch; its page shows the progress, then offers the bundles (a tar)
    as a one-time download."""
    st = state(request)
    form = await request.post()
    count_text = _form_text(form, "count")
    try:
        provisioning(st)
        if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_CONSOLE_BATCH:
            raise InvalidValue("count", count_text, f"a whole number from 1 to {MAX_CONSOLE_BATCH}")
        ttl = _ttl(_form_text(form, "token_ttl"))
    except (InvalidValue, InvalidDuration, ServiceError) as exc:
        return await render_batches(request, error=str(exc), status=400)
    _, operator = current(request)
    job = request.app[BATCH_JOBS].start(operator.name, int(count_text), st.clock())
    task = asyncio.get_running_loop().create_task(
        _run_batch(
            request,
            job,
            prefix=_form_text(form, "prefix") or "dev-",
            ttl=ttl,
            note=_form_text(form, "note"),
            actor=operator.actor,
        ),
        name=f"fleetpki-console-batch-{job.job_id}",
    )
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/batches/jobs/{job.job_id}")


async def _run_batch(
    request: web.Request,
    job: BatchJob,
    *,
    prefix: str,
    ttl: timedelta | None,
    note: str,
    actor: str,
) -> None:
    st, downloads = state(request), request.app[DOWNLOADS]
    workspace = downloads.workspace()
    try:
        result = await create_token_batch(
            st,
            count=job.count,
            prefix=prefix,
            token_ttl=ttl,
            actor=actor,
            note=note,
            out_dir=workspace / "bundles",
            progress=job.progress,
        )
        job.batch_id = result.batch_id
        job.phase = "packing"
        found = await asyncio.to_thread(
            downloads.add_tree,
            workspace / "bundles",
            operator_name=job.operator_name,
            filename=f"{result.batch_id}-bundles.tar",
            what=f"bundles of batch {result.batch_id} ({result.count} devices, with their "
            "one-time tokens)",
            now=st.clock(),
        )
        job.download_id = found.download_id
    except ServiceError as exc:
        job.error = exc.reason
    except (RegistryError, InvalidIdentifier, ValueError) as exc:
        job.error = str(exc)
    except Exception:
        log.exception("console: batch creation failed")
        job.error = "batch creation failed on the server (see its log)"
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


async def revoke_batch(request: web.Request) -> web.StreamResponse:
    """Revoke a whole batch; the operator types the batch id to confirm."""
    batch_id = request.match_info["batch_id"]
    form = await request.post()
    if _form_text(form, "confirm") != batch_id:
        return await render_batch(
            request, batch_id, error="type the batch id exactly to confirm", status=400
        )
    try:
        count = await revoke_whole_batch(
            state(request),
            batch_id,
            reason=_form_text(form, "reason") or "unspecified",
            actor=_actor(request),
        )
    except UnknownBatch as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc
    except InvalidValue as exc:
        return await render_batch(request, batch_id, error=str(exc), status=400)
    return await render_batch(request, batch_id, message=f"revoked {count} devices")


async def issue_service(request: web.Request) -> web.StreamResponse:
    """A backend service identity; its key and certificate are a one-time download."""
    st = state(request)
    form = await request.post()
    name = _form_text(form, "name")
    _, operator = current(request)
    downloads = request.app[DOWNLOADS]
    try:
        home = provisioning(st)[0]
        workspace = downloads.workspace()
    except (ServiceError, DownloadGone) as exc:
        return await render_services(request, error=str(exc), status=409)
    try:
        result = await asyncio.to_thread(
            issue_service_identity,
            home.layout.root,
            name,
            workspace / name,
            st.clock(),
            actor=operator.actor,
        )
        found = await asyncio.to_thread(
            downloads.add_tree,
            result.folder,
            operator_name=operator.name,
            filename=f"{name}-service.tar",
            what=f"service {name}: key.pem, cert.pem, ca.pem (serial {result.serial:x})",
            now=st.clock(),
        )
    except (ServiceIdentityError, InvalidIdentifier, PkiError, RegistryError) as exc:
        return await render_services(request, error=str(exc), status=400)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/downloads/{found.download_id}")


async def revoke_service(request: web.Request) -> web.StreamResponse:
    st = state(request)
    form = await request.post()
    try:
        service_id = DeviceId.parse(request.match_info["name"])
    except InvalidIdentifier as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc
    found = st.registry.get_device(service_id)
    if found is None or found.role is not Role.SERVICE:
        raise web.HTTPNotFound(text=f"service {service_id.value!r} is not registered")
    try:
        await change_device_state(
            st,
            service_id,
            Transition.REVOKE,
            reason=_form_text(form, "reason") or "unspecified",
            actor=_actor(request),
        )
    except InvalidValue as exc:
        return await render_services(request, error=str(exc), status=400)
    raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/services")


async def download(request: web.Request) -> web.StreamResponse:
    """Send a one-time download and delete it: a second request finds nothing."""
    st = state(request)
    _, operator = current(request)
    downloads = request.app[DOWNLOADS]
    try:
        found = downloads.take(request.match_info["download_id"], operator.name, st.clock())
    except DownloadGone as exc:
        return aiohttp_jinja2.render_template(
            "error.html", request, {"status": 410, "why": str(exc)}, status=410
        )
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-tar",
                "Content-Disposition": f'attachment; filename="{found.filename}"',
                "Content-Length": str(found.size),
            }
        )
        await response.prepare(request)
        with found.path.open("rb") as data:
            while chunk := data.read(CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        downloads.done(found)
