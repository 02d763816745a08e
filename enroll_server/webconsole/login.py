"""The console's door: the login form, login with an operator token, logout."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from enroll_server.enrollment.operators import authenticate
from enroll_server.webconsole.context import (
    CONSOLE_PREFIX,
    LOGIN_COOKIE,
    LOGIN_THROTTLE,
    SESSION_COOKIE,
    SESSIONS,
    state,
)
from enroll_server.webconsole.sessions import ABSOLUTE_TIMEOUT

log = logging.getLogger("fleetpki.console")

# RFC 6265bis 4.1.2.7: SameSite=Strict, with HttpOnly and Secure, on every console cookie.
COOKIE_FLAGS: dict[str, Any] = {"httponly": True, "secure": True, "samesite": "Strict"}


async def login_form(request: web.Request) -> web.StreamResponse:
    return render_login(request, error=None, status=200)


def _form_text(form: Any, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def login_nonce(request: web.Request) -> str:
    """The login form's double-submit token: the cookie of the login page, if it has one."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    return nonce if 20 <= len(nonce) <= 64 else secrets.token_urlsafe(24)


def render_login(request: web.Request, *, error: str | None, status: int) -> web.Response:
    nonce = login_nonce(request)
    response = aiohttp_jinja2.render_template(
        "login.html", request, {"login_nonce": nonce, "error": error}, status=status
    )
    response.set_cookie(LOGIN_COOKIE, nonce, path=f"{CONSOLE_PREFIX}/login", **COOKIE_FLAGS)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """An operator token (the one `fleetpki operator add` printed; admin.token for 'admin')
    opens a session. Failures are counted per source address: past five a minute, 429."""
    st = state(request)
    form = await request.post()
    nonce = _form_text(form, "nonce")
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not secrets.compare_digest(nonce, cookie):
        return render_login(request, error="the login form expired: try again", status=403)
    token, now = _form_text(form, "token"), st.clock()
    operator = authenticate(st.registry.operator_credentials(), token) if token else None
    if operator is None:
        over = request.app[LOGIN_THROTTLE].failed(request.remote or "?", "", now)
        if over is not None:
            response = render_login(request, error=over.reason, status=429)
            response.headers["Retry-After"] = str(over.retry_after)
            return response
        return render_login(request, error="that is not a valid operator token", status=401)
    session_id, _ = request.app[SESSIONS].open(operator, token, now)
    response = _see_other(f"{CONSOLE_PREFIX}/")
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        path=CONSOLE_PREFIX,
        max_age=int(ABSOLUTE_TIMEOUT.total_seconds()),
        **COOKIE_FLAGS,
    )
    response.del_cookie(LOGIN_COOKIE, path=f"{CONSOLE_PREFIX}/login")
    log.info("console: operator %s logged in", operator.name)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """Ends the session on the server: its cookie is worthless from now on."""
    request.app[SESSIONS].close(request.cookies.get(SESSION_COOKIE))
    response = _see_other(f"{CONSOLE_PREFIX}/login")
    response.del_cookie(SESSION_COOKIE, path=CONSOLE_PREFIX)
    return response


def _see_other(location: str) -> web.Response:
    """303 (RFC 9110 15.4.4): after a POST, the browser GETs the next page."""
    return web.Response(status=303, headers={"Location": location})
