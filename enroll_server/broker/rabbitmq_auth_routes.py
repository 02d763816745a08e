"""The HTTP edge of RabbitMQ's HTTP auth backend: decode a question, ask the registry, answer.

Mounted on the admin listener of `fleetpki serve` (web.app.build_admin_app), under
`/rabbitmq/<secret>/`. Why there, and why a secret in the path:
- rabbitmq_auth_backend_http sends no credentials of its own (no bearer token, no client
  certificate in 3.10), so the operator token that guards the admin API cannot guard these
  routes. The admin listener binds to loopback by default (RabbitMQ runs next to a fleetpki
  node), and the path carries a 256-bit secret kept in `HOME/rabbitmq-auth.secret` (0600),
  which only `fleetpki broker rabbitmq-config` copies into RabbitMQ's advanced.config (0600).
  A wrong or missing secret answers 404, as for any unknown path. The admin listener keeps no
  access log, so the secret reaches no log.
- The answers reveal only whether an identity may connect: with the secret, nothing more
  than the broker itself already shows a client.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from aiohttp import web

from enroll_server.broker.rabbitmq_auth import (
    SYNC_USERNAME,
    Decision,
    Identity,
    decide_resource,
    decide_sync_user,
    decide_topic,
    decide_user,
    decide_vhost,
    identity_of,
)
from enroll_server.web.state import APP_STATE, AppState
from fleetpki.atomic_file import SECRET_MODE, write_atomic
from fleetpki.identity import DeviceId, is_valid_id

log = logging.getLogger("fleetpki.rabbitmq")

PREFIX = "/rabbitmq"
SECRET_FILE = "rabbitmq-auth.secret"
# The management password of rabbitmq-sync (user SYNC_USERNAME), answered here too.
SYNC_SECRET_FILE = "rabbitmq-sync.secret"


def secret_path(home: Path, name: str = SECRET_FILE) -> Path:
    return home / name


def read_secret(home: Path, name: str = SECRET_FILE) -> str | None:
    try:
        return secret_path(home, name).read_text().strip() or None
    except OSError:
        return None


def ensure_secret(home: Path, new: str, name: str = SECRET_FILE) -> str:
    """A secret of the home; `new` is written (0600, atomically) when there is none yet."""
    current = read_secret(home, name)
    if current is not None:
        return current
    write_atomic(secret_path(home, name), new.encode() + b"\n", SECRET_MODE)
    return new


def auth_url(base: str, secret: str) -> str:
    """Where RabbitMQ asks: `base` is the admin listener (https://localhost:PORT)."""
    return f"{base.rstrip('/')}{PREFIX}/{secret}"


def _state(request: web.Request) -> AppState:
    return request.app[APP_STATE]


def _check_secret(request: web.Request) -> None:
    state = _state(request)
    expected = read_secret(state.home.layout.root) if state.home is not None else None
    given = request.match_info["secret"]
    if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise web.HTTPNotFound()


def _identity(state: AppState, username: str) -> Identity | None:
    if not is_valid_id(username):
        return None
    device_id = DeviceId.parse(username)
    registry = state.registry
    device = registry.get_device(device_id)
    if device is None:
        return None
    return identity_of(username, device, registry.certificates_of(device_id), state.clock())


def _answer(question: str, decision: Decision) -> web.Response:
    if not decision.allowed:
        log.info("rabbitmq %s denied: %s", question, decision.why)
    return web.Response(text=decision.body, content_type="text/plain")


async def _params(request: web.Request) -> dict[str, str]:
    _check_secret(request)
    form = await request.post()
    return {k: str(v) for k, v in form.items()}


async def user(request: web.Request) -> web.Response:
    p = await _params(request)
    name = p.get("username", "")
    state = _state(request)
    if name == SYNC_USERNAME:
        expected = read_secret(state.home.layout.root, SYNC_SECRET_FILE) if state.home else None
        return _answer("user", decide_sync_user(p.get("password"), expected))
    return _answer("user", decide_user(name, p.get("password"), _identity(state, name)))


async def vhost(request: web.Request) -> web.Response:
    p = await _params(request)
    name = p.get("username", "")
    identity = _identity(_state(request), name)
    return _answer("vhost", decide_vhost(name, p.get("vhost", ""), p.get("client_id"), identity))


async def resource(request: web.Request) -> web.Response:
    p = await _params(request)
    name = p.get("username", "")
    identity = _identity(_state(request), name)
    decision = decide_resource(
        name,
        p.get("vhost", ""),
        p.get("resource", ""),
        p.get("name", ""),
        p.get("permission", ""),
        identity,
    )
    return _answer("resource", decision)


async def topic(request: web.Request) -> web.Response:
    p = await _params(request)
    name = p.get("username", "")
    identity = _identity(_state(request), name)
    decision = decide_topic(
        name,
        p.get("vhost", ""),
        p.get("resource", ""),
        p.get("name", ""),
        p.get("permission", ""),
        p.get("routing_key", ""),
        p.get("variable_map.client_id"),
        identity,
    )
    return _answer("topic", decision)


def rabbitmq_auth_routes() -> list[web.RouteDef]:
    base = f"{PREFIX}/{{secret}}"
    routes: list[web.RouteDef] = []
    for path, handler in (
        ("user", user),
        ("vhost", vhost),
        ("resource", resource),
        ("topic", topic),
    ):
        # POST only (rabbitmq-config sets auth_http.http_method = post): no password in a URL
        routes.append(web.post(f"{base}/{path}", handler))
    return routes
