"""The service-level error tree and the one table mapping each class to its HTTP status and
wire code (both HTTP layers build error responses with `error_headers`)."""

from __future__ import annotations

from fleetpki.error_codes import ERROR_HEADER, ErrorCode


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
    `challenge` is the WWW-Authenticate value: the scheme the client should have used.
    """

    # RFC 7617 2 / RFC 7235 3.1: a 401 names the scheme; we decode credentials as UTF-8.
    challenge = 'Basic realm="fleetpki EST", charset="UTF-8"'


class OperatorAuthenticationFailed(AuthenticationFailed):
    """No or wrong operator token on the admin API: it takes `Authorization: Bearer`
    (RFC 6750 3: the challenge names the Bearer scheme, not Basic, and says
    error="invalid_token" when a token was presented but is not valid, RFC 6750 3.1)."""

    def __init__(self, reason: str, *, invalid_token: bool = False) -> None:
        super().__init__(reason)
        self.challenge = 'Bearer realm="fleetpki admin"' + (
            ', error="invalid_token"' if invalid_token else ""
        )


class Forbidden(ServiceError):
    """Authenticated, but not allowed: revoked, suspended, another device's certificate (403)."""


class DeviceInactive(Forbidden):
    """The device may not act: `state` is its registry state (suspended, revoked, provisioned)
    or "unknown". Build it with `device_inactive`, which picks the subclass a client acts on."""

    def __init__(self, device_id: str, state: str) -> None:
        super().__init__(f"device {device_id} is {state}")
        self.device_id = device_id
        self.state = state


class DeviceRevoked(DeviceInactive):
    """Revoked: final (RFC 5280 5.3.1); the device needs a new token to come back."""

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id, "revoked")


class DeviceSuspended(DeviceInactive):
    """Suspended (certificates on hold, RFC 5280 5.3.1 certificateHold): reversible, so a
    device waits for `fleetpki device resume` instead of stopping."""

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id, "suspended")


def device_inactive(device_id: str, state: str) -> DeviceInactive:
    """The refusal of a device in registry state `state` (not active)."""
    if state == "revoked":
        return DeviceRevoked(device_id)
    if state == "suspended":
        return DeviceSuspended(device_id)
    return DeviceInactive(device_id, state)


class NotFound(ServiceError):
    """An operator asked about something that does not exist (HTTP 404)."""


class Conflict(ServiceError):
    """The request conflicts with the current state (HTTP 409)."""


class UnsupportedMediaType(ServiceError):
    """The request's Content-Type is not one the operation accepts (HTTP 415)."""


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


# The one table: each error class, its HTTP status (RFC 7030 4.2.3 leaves codes to HTTP) and
# its machine-readable code (fleetpki/error_codes.py). A class not listed takes its nearest
# listed base's entry.
ERRORS: dict[type[ServiceError], tuple[int, ErrorCode]] = {
    ServiceError: (400, ErrorCode.BAD_REQUEST),
    BadRequest: (400, ErrorCode.BAD_REQUEST),
    AuthenticationFailed: (401, ErrorCode.AUTHENTICATION_FAILED),
    OperatorAuthenticationFailed: (401, ErrorCode.AUTHENTICATION_FAILED),
    Forbidden: (403, ErrorCode.FORBIDDEN),
    DeviceInactive: (403, ErrorCode.DEVICE_NOT_ACTIVE),
    DeviceSuspended: (403, ErrorCode.DEVICE_SUSPENDED),
    DeviceRevoked: (403, ErrorCode.DEVICE_REVOKED),
    NotFound: (404, ErrorCode.NOT_FOUND),
    Conflict: (409, ErrorCode.CONFLICT),
    UnsupportedMediaType: (415, ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    TooManyRequests: (429, ErrorCode.TOO_MANY_REQUESTS),
    Unavailable: (503, ErrorCode.UNAVAILABLE),
}


def wire_error(exc: ServiceError) -> tuple[int, ErrorCode]:
    """(HTTP status, error code) of `exc`, from ERRORS."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    raise AssertionError("unreachable: ServiceError is in ERRORS")


def http_status(exc: ServiceError) -> int:
    return wire_error(exc)[0]


def error_headers(exc: ServiceError) -> dict[str, str]:
    """The headers of the error response to `exc` (besides Content-Type): its code, the
    scheme of a 401, the Retry-After of a refusal for now (RFC 9110 10.2.3)."""
    _, code = wire_error(exc)
    headers = {ERROR_HEADER: code.value}
    if isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = exc.challenge
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(exc.retry_after)
    return headers
