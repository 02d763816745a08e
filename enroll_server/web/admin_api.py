"""Operator HTTP API (an operator's bearer token; viewers read only): devices, certificates,
revocation, batches, audit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

from aiohttp import web

from enroll_server.enrollment.operators import operator_for
from enroll_server.errors import BadRequest, Conflict, NotFound
from enroll_server.registry import (
    CertificateRecord,
    Device,
    DuplicateBatch,
    DuplicateDevice,
    InvalidValue,
    Operator,
    UnknownBatch,
    UnknownCertificate,
    UnknownDevice,
    parse_serial,
)
from enroll_server.web.operator_actions import (
    Transition,
    change_device_state,
    create_token_batch,
    new_device_token,
)
from enroll_server.web.operator_actions import revoke_batch as revoke_whole_batch
from enroll_server.web.operator_actions import revoke_certificate as revoke_certificate_now
from enroll_server.web.provisioner import TokenPurpose
from enroll_server.web.state import APP_STATE, AppState
from fleetpki.duration import InvalidDuration, parse_duration
from fleetpki.identity import DeviceId, InvalidIdentifier

ADMIN_PREFIX = "/admin"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def device_json(device: Device) -> dict[str, Any]:
    return {
        "device_id": device.device_id.value,
        "role": device.role.value,
        "batch_id": device.batch_id,
        "state": device.state.value,
        "created_at": device.created_at.isoformat(),
        "updated_at": device.updated_at.isoformat(),
        "enrolled_at": device.enrolled_at.isoformat() if device.enrolled_at else None,
        "token_expires_at": (
            device.token_expires_at.isoformat() if device.token_expires_at else None
        ),
    }


def certificate_json(cert: CertificateRecord) -> dict[str, Any]:
    return {
        "serial": f"{cert.serial:x}",
        "fingerprint_sha256": cert.fingerprint_sha256,
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "issued_at": cert.issued_at.isoformat(),
        "status": cert.status.value,
        "revoked_at": cert.revoked_at.isoformat() if cert.revoked_at else None,
        "revocation_reason": cert.revocation_reason,
    }


OPERATOR = web.RequestKey("fleetpki_operator", Operator)


def require_operator(handler: Handler) -> Handler:
    """`handler`, behind an operator's bearer token (operators.operator_for: 401 without
    a valid one, 403 for a viewer's POST); the operator is `request[OPERATOR]`."""

    @wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request[OPERATOR] = operator_for(
            request.app[APP_STATE].registry, request.headers.get("Authorization"), request.method
        )
        return await handler(request)

    return wrapped


def actor_of(request: web.Request) -> str:
    """Who the audit log says acted: the operator, by name."""
    return request[OPERATOR].actor


def _st(request: web.Request) -> AppState:
    return request.app[APP_STATE]


def _device_id(request: web.Request) -> DeviceId:
    try:
        return DeviceId.parse(request.match_info["device_id"])
    except InvalidIdentifier as exc:
        raise BadRequest(str(exc)) from exc


# Paging bounds: SQLite integers are 64-bit, and a page larger than this is a mistake.
MAX_QUERY_INT = 1_000_000_000


def _query_int(request: web.Request, name: str, default: int) -> int:
    """The non-negative integer query parameter `name` (`default` when absent); a 400 naming
    the parameter and the value otherwise."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {text[:40]!r}") from None
    if not 0 <= value <= MAX_QUERY_INT:
        raise BadRequest(f"query parameter {name} must be 0..{MAX_QUERY_INT}, got {value}")
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest("request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


@require_operator
async def list_devices(request: web.Request) -> web.Response:
    q = request.query
    limit = _query_int(request, "limit", 1000)
    offset = _query_int(request, "offset", 0)
    try:
        devices = _st(request).registry.list_devices(
            state=q.get("state"), batch_id=q.get("batch"), limit=limit, offset=offset
        )
    except InvalidValue as exc:
        raise BadRequest(str(exc)) from exc
    return web.json_response({"devices": [device_json(d) for d in devices]})


@require_operator
async def show_device(request: web.Request) -> web.Response:
    device_id = _device_id(request)
    registry = _st(request).registry
    device = registry.get_device(device_id)
    if device is None:
        raise NotFound(str(UnknownDevice(device_id)))
    certs = registry.certificates_of(device_id)
    return web.json_response(
        {**device_json(device), "certificates": [certificate_json(c) for c in certs]}
    )


def _transition(action: Transition) -> Handler:
    @require_operator
    async def handler(request: web.Request) -> web.Response:
        device_id = _device_id(request)
        body = await _json_body(request)
        try:
            serials = await change_device_state(
                _st(request),
                device_id,
                action,
                reason=str(body.get("reason", "unspecified")),
                actor=actor_of(request),
            )
        except UnknownDevice as exc:
            raise NotFound(str(exc)) from exc
        except InvalidValue as exc:
            raise BadRequest(str(exc)) from exc
        return web.json_response(
            {"device_id": device_id.value, "action": action, "serials": [f"{s:x}" for s in serials]}
        )

    return handler


def _serial(request: web.Request) -> int:
    try:
        return parse_serial(request.match_info["serial"])
    except InvalidValue as exc:
        raise BadRequest(str(exc)) from exc


@require_operator
async def show_certificate(request: web.Request) -> web.Response:
    serial = _serial(request)
    record = _st(request).registry.get_certificate(serial)
    if record is None:
        raise NotFound(str(UnknownCertificate(serial)))
    return web.json_response({"device_id": record.device_id.value, **certificate_json(record)})


@require_operator
async def revoke_certificate(request: web.Request) -> web.Response:
    """POST /admin/certificates/{serial}/revoke {"reason": "key-compromise"}: one certificate;
    its identity stays registered. The broker drops a session presenting it (registry event)."""
    serial = _serial(request)
    body = await _json_body(request)
    try:
        device_id, serials = await revoke_certificate_now(
            _st(request),
            serial,
            reason=str(body.get("reason", "unspecified")),
            actor=actor_of(request),
        )
    except UnknownCertificate as exc:
        raise NotFound(str(exc)) from exc
    except InvalidValue as exc:
        raise BadRequest(str(exc)) from exc
    return web.json_response({"device_id": device_id.value, "revoked": [f"{s:x}" for s in serials]})


def _device_token(purpose: TokenPurpose) -> Handler:
    """POST /admin/devices/{id}/rekey or /readmit {"token_ttl": "7d"} -> a new one-time token,
    in this one response only (as POST /admin/batches gives tokens)."""

    @require_operator
    async def handler(request: web.Request) -> web.Response:
        device_id = _device_id(request)
        body = await _json_body(request)
        ttl_text = body.get("token_ttl")
        try:
            ttl = parse_duration(ttl_text) if isinstance(ttl_text, str) else None
            result = await new_device_token(
                _st(request), device_id, purpose, ttl=ttl, actor=actor_of(request)
            )
        except UnknownDevice as exc:
            raise NotFound(str(exc)) from exc
        except (InvalidDuration, InvalidValue) as exc:
            raise BadRequest(str(exc)) from exc
        return web.json_response(
            {
                "device_id": device_id.value,
                "token": result.token,
                "token_expires_at": result.expires_at.isoformat(),
                "revoked": [f"{s:x}" for s in result.cut_off],
            }
        )

    return handler


@require_operator
async def list_batches(request: web.Request) -> web.Response:
    registry = _st(request).registry
    now = _st(request).clock()
    out = []
    for b in registry.list_batches():
        out.append(
            {
                "batch_id": b.batch_id,
                "kind": b.kind.value,
                "created_at": b.created_at.isoformat(),
                "device_count": b.device_count,
                "counts": registry.batch_counts(b.batch_id, now),
            }
        )
    return web.json_response({"batches": out})


@require_operator
async def create_batch(request: web.Request) -> web.Response:
    """POST /admin/batches {"count": N, "prefix": "pi-", "token_ttl": "7d"} -> ids and tokens.

    Nothing is written to disk: the clear tokens are in this one response (and only their
    hashes in the registry), for factory systems that flash devices themselves.
    """
    body = await _json_body(request)
    count = body.get("count")
    prefix = body.get("prefix", "dev-")
    ttl_text = body.get("token_ttl")
    if not isinstance(count, int) or isinstance(count, bool):
        raise BadRequest(f"count must be an integer, got {count!r}")
    if not isinstance(prefix, str):
        raise BadRequest(f"prefix must be a string, got {prefix!r}")
    try:
        ttl = parse_duration(ttl_text) if isinstance(ttl_text, str) else None
        result = await create_token_batch(
            _st(request),
            count=count,
            prefix=prefix,
            token_ttl=ttl,
            actor=actor_of(request),
            batch_id=body.get("batch_id") if isinstance(body.get("batch_id"), str) else None,
            note=str(body.get("note", "")),
        )
    except InvalidDuration as exc:
        raise BadRequest(str(exc)) from exc
    except (DuplicateDevice, DuplicateBatch) as exc:
        raise Conflict(str(exc)) from exc
    except (InvalidValue, InvalidIdentifier) as exc:
        raise BadRequest(str(exc)) from exc
    return web.json_response(result.to_json(include_tokens=True), status=201)


@require_operator
async def revoke_batch(request: web.Request) -> web.Response:
    body = await _json_body(request)
    batch_id = request.match_info["batch_id"]
    try:
        count = await revoke_whole_batch(
            _st(request),
            batch_id,
            reason=str(body.get("reason", "unspecified")),
            actor=actor_of(request),
        )
    except UnknownBatch as exc:
        raise NotFound(str(exc)) from exc
    except InvalidValue as exc:
        raise BadRequest(str(exc)) from exc
    return web.json_response({"batch_id": batch_id, "revoked_devices": count})


@require_operator
async def audit(request: web.Request) -> web.Response:
    registry = _st(request).registry
    device = request.query.get("device")
    try:
        device_id = DeviceId.parse(device) if device else None
    except InvalidIdentifier as exc:
        raise BadRequest(str(exc)) from exc
    limit = _query_int(request, "limit", 100)
    entries = registry.audit_log(device_id=device_id, limit=limit)
    return web.json_response(
        {
            "audit": [
                {
                    "seq": e.seq,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "device_id": e.device_id.value if e.device_id else None,
                    "detail": e.detail,
                }
                for e in entries
            ]
        }
    )


def admin_routes() -> list[web.RouteDef]:
    p = ADMIN_PREFIX
    return [
        web.get(f"{p}/devices", list_devices),
        web.get(f"{p}/devices/{{device_id}}", show_device),
        web.post(f"{p}/devices/{{device_id}}/revoke", _transition(Transition.REVOKE)),
        web.post(f"{p}/devices/{{device_id}}/suspend", _transition(Transition.SUSPEND)),
        web.post(f"{p}/devices/{{device_id}}/resume", _transition(Transition.RESUME)),
        web.post(f"{p}/devices/{{device_id}}/rekey", _device_token("rekey")),
        web.post(f"{p}/devices/{{device_id}}/readmit", _device_token("readmit")),
        web.get(f"{p}/certificates/{{serial}}", show_certificate),
        web.post(f"{p}/certificates/{{serial}}/revoke", revoke_certificate),
        web.get(f"{p}/batches", list_batches),
        web.post(f"{p}/batches", create_batch),
        web.post(f"{p}/batches/{{batch_id}}/revoke", revoke_batch),
        web.get(f"{p}/audit", audit),
    ]
