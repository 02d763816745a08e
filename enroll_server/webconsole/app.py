"""The console's aiohttp sub-application: its route table, and the one gate every request
passes (a live session, the admin role and a CSRF token for every POST, the security headers
on every response)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from enroll_server.enrollment.throttle import Throttle
from enroll_server.registry import OperatorRole
from enroll_server.web.state import APP_STATE, AppState
from enroll_server.webconsole import actions, live, login, pages
from enroll_server.webconsole.activity import RefusalCounter
from enroll_server.webconsole.context import (
    BATCH_JOBS,
    CONSOLE_PREFIX,
    CURRENT,
    DOWNLOADS,
    LOGIN_THROTTLE,
    REFUSALS,
    SESSION_COOKIE,
    SESSIONS,
    state,
)
from enroll_server.webconsole.downloads import Downloads
from enroll_server.webconsole.jobs import BatchJobs
from enroll_server.webconsole.sessions import SessionStore, csrf_ok

HERE = Path(__file__).parent

# script-src 'self' only: no inline script, no eval; the one script is static/console.js.
# frame-ancestors 'none' and X-Frame-Options DENY: no page can be framed (clickjacking).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Routes a browser may reach without a session.
PUBLIC_ROUTES = frozenset({"login", "login_form", "static"})
# POSTs a viewer may make (ending its own session is no change to the fleet).
VIEWER_POSTS = frozenset({"logout"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _refuse(request: web.Request, status: int, why: str) -> web.Response:
    response = aiohttp_jinja2.render_template(
        "error.html", request, {"status": status, "why": why}, status=status
    )
    return response


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No page or action without a live session; a POST also needs its session's CSRF token
    and, but for logout, the admin role. A GET never changes anything, so it needs neither."""
    route = request.match_info.route.name
    if route in PUBLIC_ROUTES:
        return await handler(request)
    st = state(request)
    found = request.app[SESSIONS].current(
        request.cookies.get(SESSION_COOKIE), st.registry.operator_credentials(), st.clock()
    )
    if found is None:
        if request.method == "GET":
            raise web.HTTPSeeOther(f"{CONSOLE_PREFIX}/login")
        return _refuse(request, 401, "log in first (no session, or it has ended)")
    session, operator = found
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        submitted = form.get("csrf")
        if not csrf_ok(session, submitted if isinstance(submitted, str) else None):
            return _refuse(request, 403, "this form is stale or forged (no valid CSRF token)")
        if operator.role is not OperatorRole.ADMIN and route not in VIEWER_POSTS:
            return _refuse(
                request,
                403,
                f"operator {operator.name} has the {operator.role.value} role: read only",
            )
    request[CURRENT] = found
    return await handler(request)


def build_console_app(st: AppState) -> web.Application:
    """The console, to be mounted at /console/ on the admin listener (add_subapp)."""
    app = web.Application(middlewares=[gate])
    app[APP_STATE] = st
    app[SESSIONS] = SessionStore(st.registry)
    # Five wrong tokens a minute from one address, then 429 (a correct token always works).
    app[LOGIN_THROTTLE] = Throttle(per_source=5, per_device=5, window=timedelta(minutes=1))
    app[DOWNLOADS] = Downloads(
        None if st.home is None else st.home.layout.root / "console-downloads"
    )
    app[BATCH_JOBS] = BatchJobs()
    app[REFUSALS] = RefusalCounter()
    app.on_response_prepare.append(_security_headers)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every stored string is text, whatever it looks like
        context_processors=[pages.page_context],
    )
    app.router.add_static("/static/", HERE / "static", name="static")
    app.add_routes(ROUTES)
    live.attach(app)
    app.on_cleanup.append(lambda _app: _discard_downloads(app))
    return app


async def _discard_downloads(app: web.Application) -> None:
    app[DOWNLOADS].discard_all()


ROUTES = [
    web.get("/login", login.login_form, name="login_form"),
    web.post("/login", login.login, name="login"),
    web.post("/logout", login.logout, name="logout"),
    web.get("/", pages.overview, name="overview"),
    web.get("/devices", pages.devices, name="devices"),
    web.get("/devices/{device_id}", pages.device, name="device"),
    web.post("/devices/{device_id}/{action:revoke|suspend|resume}", actions.device_transition),
    web.post("/devices/{device_id}/token", actions.device_token),
    web.get("/batches", pages.batches, name="batches"),
    web.post("/batches", actions.create_batch),
    web.get("/batches/jobs/{job_id}", pages.batch_job, name="batch_job"),
    web.get("/batches/{batch_id}", pages.batch, name="batch"),
    web.get("/batches/{batch_id}/manifest.csv", pages.batch_manifest),
    web.post("/batches/{batch_id}/revoke", actions.revoke_batch),
    web.get("/services", pages.services, name="services"),
    web.post("/services", actions.issue_service),
    web.post("/services/{name}/revoke", actions.revoke_service),
    web.get("/downloads/{download_id}", pages.download_page, name="download_page"),
    web.post("/downloads/{download_id}", actions.download),
    web.get("/audit", pages.audit, name="audit"),
    web.get("/events", live.events, name="events"),
]
