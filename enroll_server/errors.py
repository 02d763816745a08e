"""The service-level error tree; http_app maps each class to one HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of errors the enrollment service reports to a client; `reason` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(ServiceError):
    """The request itself is malformed or asks for what policy refuses (HTTP 400)."""


class AuthenticationFailed(ServiceError):
    """No or wrong credentials (HTTP 401 with WWW-Authenticate).

    The reason never tells an unknown device from a wrong token (no enumeration oracle).
    """


class Forbidden(ServiceError):
    """Authenticated, but not allowed: revoked, suspended, another device's certificate (403)."""


class DeviceRevoked(Forbidden):
    def __init__(self, device_id: str, state: str = "revoked") -> None:
        super().__init__(f"device {device_id} is {state}")
        self.device_id = device_id
        self.state = state


class NotFound(ServiceError):
    """An operator asked about something that does not exist (HTTP 404)."""


class Conflict(ServiceError):
    """The request conflicts with the current state (HTTP 409)."""


class RetryLater(ServiceError):
    """Refused for now: the client may ask again after `retry_after` seconds (Retry-After,
    RFC 9110 10.2.3)."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class TooManyRequests(RetryLater):
    """Throttled (HTTP 429 with Retry-After)."""


class Unavailable(RetryLater):
    """The service cannot complete the request now, through no fault of the client's (503)."""


# One table maps the error tree to HTTP status codes (RFC 7030 4.2.3 leaves codes to HTTP);
# both HTTP layers (http_app's middleware and the lean EST front end) use it.
HTTP_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    AuthenticationFailed: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooManyRequests: 429,
    Unavailable: 503,
}
# RFC 7617 2 / RFC 7235 3.1: a 401 names the scheme; we decode credentials as UTF-8.
WWW_AUTHENTICATE = 'Basic realm="fleetpki EST", charset="UTF-8"'


def http_status(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400
