"""What the console's handlers share: its path, cookie names, and the keys of its app-wide
and per-request state."""

from __future__ import annotations

from aiohttp import web

from enroll_server.enrollment.throttle import Throttle
from enroll_server.registry import Operator
from enroll_server.web.state import APP_STATE, AppState
from enroll_server.webconsole.activity import RefusalCounter
from enroll_server.webconsole.downloads import Downloads
from enroll_server.webconsole.jobs import BatchJobs
from enroll_server.webconsole.sessions import Session, SessionStore

CONSOLE_PREFIX = "/console"
SESSION_COOKIE = "fleetpki_console"
LOGIN_COOKIE = "fleetpki_console_login"

SESSIONS = web.AppKey("fleetpki_console_sessions", SessionStore)
LOGIN_THROTTLE = web.AppKey("fleetpki_console_login_throttle", Throttle)
DOWNLOADS = web.AppKey("fleetpki_console_downloads", Downloads)
BATCH_JOBS = web.AppKey("fleetpki_console_batch_jobs", BatchJobs)
REFUSALS = web.AppKey("fleetpki_console_refusals", RefusalCounter)
CURRENT = web.RequestKey("fleetpki_console_current", tuple[Session, Operator])


def current(request: web.Request) -> tuple[Session, Operator]:
    """The session and operator the gate admitted this request for."""
    return request[CURRENT]


def state(request: web.Request) -> AppState:
    return request.app[APP_STATE]
