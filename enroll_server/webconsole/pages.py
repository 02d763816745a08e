"""The console's pages (GET only: each reads the registry and renders a template, never
changes anything)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from cryptography import x509

from enroll_server.registry import (
    DeviceState,
    InvalidValue,
    OperatorRole,
    UnknownBatch,
)
from enroll_server.registry.fleet_view import AuditQuery, DeviceQuery
from enroll_server.registry.models import REVOKE_REASON_OPTIONS
from enroll_server.webconsole import activity
from enroll_server.webconsole.context import (
    BATCH_JOBS,
    CONSOLE_PREFIX,
    CURRENT,
    DOWNLOADS,
    REFUSALS,
    current,
    state,
)
from enroll_server.webconsole.downloads import DownloadGone
from fleetpki.identity import DeviceId, InvalidIdentifier

PAGE_SIZE = 50
AUDIT_PAGE = 100
EXPIRY_WINDOW = timedelta(days=7)


async def page_context(request: web.Request) -> dict[str, Any]:
    """What every template may use: the operator, whether it may act, its CSRF token."""
    found = request.get(CURRENT)
    if found is None:
        return {"operator": None, "can_act": False, "csrf": "", "base": CONSOLE_PREFIX}
    session, operator = found
    return {
        "operator": operator,
        "can_act": operator.role is OperatorRole.ADMIN,
        "csrf": session.csrf,
        "base": CONSOLE_PREFIX,
    }


def _connected(request: web.Request) -> set[str] | None:
    """Identities with a live session on the embedded broker; None: this process has none."""
    live = state(request).live_sessions
    return None if live is None else set(live())


def _expiry(cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "not_after": after,
        "days": (after - now).days,
    }


@aiohttp_jinja2.template("overview.html")
async def overview(request: web.Request) -> dict[str, Any]:
    st = state(request)
    registry, now = st.registry, st.clock()
    by_state = registry.devices_by_state()
    counter = request.app[REFUSALS]
    refused = activity.refused_total(dict(st.metrics.enrollments.values))
    counter.sample(refused, now)
    since = activity.hour_floor(now) - timedelta(hours=activity.HOURS - 1)
    rows = registry.audit_actions_since(since, activity.CHART_ACTIONS)
    chart = activity.chart(activity.hourly(rows, counter.per_hour(), now))
    expiring, expiring_total = registry.expiring_unrenewed(now, now + EXPIRY_WINDOW, limit=20)
    crl = None
    if st.current_crl is not None:
        published = st.current_crl()
        crl = {"number": published.number, "next_update": published.next_update}
    tls = None
    if st.home is not None:
        tls = _expiry(x509.load_pem_x509_certificate(st.home.layout.server_cert.read_bytes()), now)
    connected = _connected(request)
    recent = registry.audit_search(AuditQuery(), limit=15)
    return {
        "nav": "overview",
        "now": now,
        "by_state": by_state,
        "total": sum(by_state.values()),
        "connected": None if connected is None else len(connected),
        "chart": chart,
        "series": activity.SERIES,
        "expiring": expiring,
        "expiring_total": expiring_total,
        "crl": crl,
        "tls": tls,
        "issuing": _expiry(st.ca_chain[0], now),
        "root": _expiry(st.ca_chain[-1], now) if len(st.ca_chain) > 1 else None,
        "recent": recent,
        "refused": refused,
        "last_seq": recent[0].seq if recent else 0,
    }


def _int(request: web.Request, name: str, default: int, maximum: int) -> int:
    try:
        return min(maximum, max(1, int(request.query.get(name, default))))
    except ValueError:
        return default


@aiohttp_jinja2.template("devices.html")
async def devices(request: web.Request) -> dict[str, Any]:
    st = state(request)
    q = request.query
    query = DeviceQuery(
        prefix=q.get("q", "").strip(),
        state=q.get("state") or None,
        batch_id=q.get("batch") or None,
        descending=q.get("order") == "desc",
    )
    page = _int(request, "page", 1, 10_000_000)
    error = None
    try:
        found = st.registry.device_page(query, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        total = st.registry.device_total(query)
    except InvalidValue as exc:
        found, total, error = [], 0, str(exc)
    return {
        "nav": "devices",
        "query": query,
        "devices": found,
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "states": [s.value for s in DeviceState],
        "batches": [b.batch_id for b in st.registry.list_batches()],
        "connected": _connected(request),
        "error": error,
        "params": {k: v for k, v in q.items() if k != "page"},
    }


def device_id_of(request: web.Request) -> DeviceId:
    try:
        return DeviceId.parse(request.match_info["device_id"])
    except InvalidIdentifier as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc


async def device(request: web.Request) -> web.StreamResponse:
    return await render_device(request, device_id_of(request))


async def render_device(
    request: web.Request,
    device_id: DeviceId,
    *,
    message: str | None = None,
    error: str | None = None,
    token: Any = None,
    status: int = 200,
) -> web.StreamResponse:
    """The device page, with the outcome of an action just taken if any (a new token is
    shown in this one response only)."""
    st = state(request)
    found = st.registry.get_device(device_id)
    if found is None:
        return aiohttp_jinja2.render_template(
            "error.html",
            request,
            {"status": 404, "why": f"device {device_id.value} is not registered"},
            status=404,
        )
    connected = _connected(request)
    context = {
        "nav": "devices",
        "device": found,
        "certificates": st.registry.certificates_of(device_id),
        "connected": None if connected is None else device_id.value in connected,
        "audit": st.registry.audit_log(device_id=device_id, limit=50),
        "reasons": REVOKE_REASON_OPTIONS,
        "message": message,
        "error": error,
        "token": token,
        "last_seq": st.registry.last_audit_seq(),
    }
    return aiohttp_jinja2.render_template("device.html", request, context, status=status)


async def batches(request: web.Request) -> web.StreamResponse:
    return await render_batches(request)


async def render_batches(
    request: web.Request, *, error: str | None = None, status: int = 200
) -> web.StreamResponse:
    st = state(request)
    now = st.clock()
    summaries = [
        {"batch": b, "counts": st.registry.batch_counts(b.batch_id, now)}
        for b in reversed(st.registry.list_batches())  # newest first
    ]
    context = {"nav": "batches", "batches": summaries, "error": error}
    return aiohttp_jinja2.render_template("batches.html", request, context, status=status)


async def batch(request: web.Request) -> web.StreamResponse:
    return await render_batch(request, request.match_info["batch_id"])


async def render_batch(
    request: web.Request,
    batch_id: str,
    *,
    message: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> web.StreamResponse:
    st = state(request)
    found = st.registry.get_batch(batch_id)
    try:
        if found is None:
            raise UnknownBatch(batch_id)
        summary = {"batch": found, "counts": st.registry.batch_counts(batch_id, st.clock())}
    except UnknownBatch as exc:
        return aiohttp_jinja2.render_template(
            "error.html", request, {"status": 404, "why": str(exc)}, status=404
        )
    context = {
        "nav": "batches",
        "summary": summary,
        "reasons": REVOKE_REASON_OPTIONS,
        "message": message,
        "error": error,
    }
    return aiohttp_jinja2.render_template("batch.html", request, context, status=status)


async def batch_manifest(request: web.Request) -> web.Response:
    """The batch's manifest with each device's state (`fleetpki batch export`)."""
    st = state(request)
    batch_id = request.match_info["batch_id"]
    out = io.StringIO()
    if st.provisioner is None:
        raise web.HTTPConflict(text="this server was started without the operator tooling")
    try:
        st.provisioner.export_manifest(st.registry, batch_id, out)
    except UnknownBatch as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{batch_id}-manifest.csv"'},
    )


async def batch_job(request: web.Request) -> web.StreamResponse:
    _, operator = current(request)
    job = request.app[BATCH_JOBS].get(request.match_info["job_id"], operator.name)
    if job is None:
        return aiohttp_jinja2.render_template(
            "error.html", request, {"status": 404, "why": "no such batch job"}, status=404
        )
    return aiohttp_jinja2.render_template("batch_job.html", request, {"nav": "batches", "job": job})


async def services(request: web.Request) -> web.StreamResponse:
    return await render_services(request)


async def render_services(
    request: web.Request, *, error: str | None = None, status: int = 200
) -> web.StreamResponse:
    from enroll_server.enrollment.identities import service_summary

    st = state(request)
    rows = [service_summary(st.registry, s) for s in st.registry.list_devices(role="service")]
    context = {
        "nav": "services",
        "services": rows,
        "reasons": REVOKE_REASON_OPTIONS,
        "error": error,
        "connected": _connected(request),
    }
    return aiohttp_jinja2.render_template("services.html", request, context, status=status)


async def download_page(request: web.Request) -> web.StreamResponse:
    st = state(request)
    _, operator = current(request)
    try:
        found = request.app[DOWNLOADS].peek(
            request.match_info["download_id"], operator.name, st.clock()
        )
    except DownloadGone as exc:
        return aiohttp_jinja2.render_template(
            "error.html", request, {"status": 410, "why": str(exc)}, status=410
        )
    return aiohttp_jinja2.render_template("download.html", request, {"download": found})


def _when(text: str | None) -> datetime | None:
    """A datetime-local form value, read as UTC (the console shows every time in UTC)."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValue("time", text, "YYYY-MM-DDTHH:MM (UTC)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@aiohttp_jinja2.template("audit.html")
async def audit(request: web.Request) -> dict[str, Any]:
    st = state(request)
    q = request.query
    error = None
    entries: list[Any] = []
    try:
        device_text = q.get("device", "").strip()
        before = q.get("before")
        query = AuditQuery(
            actor=q.get("actor", "").strip() or None,
            action=q.get("action", "").strip() or None,
            device_id=DeviceId.parse(device_text) if device_text else None,
            since=_when(q.get("since")),
            until=_when(q.get("until")),
            before_seq=int(before) if before and before.isdigit() else None,
        )
        entries = st.registry.audit_search(query, limit=AUDIT_PAGE)
    except (InvalidValue, InvalidIdentifier) as exc:
        error = str(exc)
    params = {k: v for k, v in q.items() if k != "before"}
    return {
        "nav": "audit",
        "entries": entries,
        "error": error,
        "params": params,
        "older": entries[-1].seq if len(entries) == AUDIT_PAGE else None,
    }
