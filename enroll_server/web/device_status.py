"""`GET /device/status`: a device asks, over mTLS, whether its certificate is in good standing.

EST (RFC 7030) has no status operation, so this lives outside /.well-known/est/. After the
broker refuses a device (an MQTT 3.1.1 CONNACK 5 or a TLS alert says no why), the agent asks
here: 200 if it may act, else the error table's answer (403 with `Fleetpki-Error:
device-suspended`, which is reversible, or `device-revoked`, which is final). Read-only: the
same check as simplereenroll's authorization, nothing issued or recorded.
"""

from __future__ import annotations

from aiohttp import web

from enroll_server.errors import Forbidden
from enroll_server.est.routes import peer_certificate
from enroll_server.web.state import APP_STATE

DEVICE_STATUS_PATH = "/device/status"


async def device_status(request: web.Request) -> web.Response:
    st = request.app[APP_STATE]
    cert = peer_certificate(request)
    if cert is None:
        raise Forbidden(
            f"{DEVICE_STATUS_PATH} requires TLS client authentication with the device certificate"
        )
    auth = st.service.authorize_certificate(cert, st.clock())
    return web.json_response(
        {
            "device": auth.grant.device_id.value,
            "state": "active",
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
    )


def device_status_routes() -> list[web.RouteDef]:
    return [web.get(DEVICE_STATUS_PATH, device_status)]
