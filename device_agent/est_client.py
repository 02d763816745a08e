"""The EST client (RFC 7030): cacerts, simpleenroll (token or IDevID), simplereenroll over mTLS,
and the service's device status (GET /device/status over mTLS)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from device_agent import __version__, http11
from device_agent.clock import parse_http_date
from device_agent.config import EstServer
from device_agent.errors import (
    DeviceRevoked,
    DeviceSuspended,
    EstError,
    EstProtocolError,
    EstRejected,
    EstRetryLater,
    EstUnavailable,
    TlsVerificationFailed,
)
from device_agent.est_wire import WireError, decode_certs_only, encode_csr, parse_retry_after
from device_agent.tls import client_context
from fleetpki.error_codes import ERROR_HEADER, ErrorCode
from fleetpki.identity import DeviceId

_REASON_MAX = 300
log = logging.getLogger("fleetpki.agent")


class EstClient:
    """Talks to one EST server; every connection verifies the server against the trust anchor.

    `last_server_date` keeps the Date header of the last answer: a hint of the real time for a
    device whose clock has not been set yet.
    """

    def __init__(
        self,
        server: EstServer | Sequence[EstServer],
        trust_anchor: Path,
        *,
        timeout: float = 30.0,
    ) -> None:
        """`server`: one EST server, or several nodes of one service in the order to try them
        (AgentConfig.est_servers): a request that cannot reach one (refused, timed out, a TLS
        failure) goes to the next, and the client stays on the one that answered."""
        self.servers = (server,) if isinstance(server, EstServer) else tuple(server)
        if not self.servers:
            raise ValueError("EstClient needs at least one server")
        self._current = 0
        self.trust_anchor = trust_anchor
        self.timeout = timeout
        self.last_server_date: datetime | None = None

    @property
    def server(self) -> EstServer:
        """The server in use: the last one that answered (the first until one has)."""
        return self.servers[self._current]

    def _url(self, path: str, server: EstServer | None = None) -> str:
        server = server or self.server
        return f"https://{server.host}:{server.port}{path}"

    async def _call(
        self,
        method: str,
        path: str,
        ctx: ssl.SSLContext,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> http11.HttpResponse:
        """One request, to the server in use, else to the next that can be reached. Only a
        failure to get an answer moves on; an answer (any status) is the service's word."""
        relative = path[len(self.server.path_prefix) :]
        failed: EstUnavailable | TlsVerificationFailed | None = None
        for step in range(len(self.servers)):
            index = (self._current + step) % len(self.servers)
            server = self.servers[index]
            try:
                response = await self._request(
                    server, method, server.path_prefix + relative, ctx, headers, body
                )
            except (EstUnavailable, TlsVerificationFailed) as exc:
                failed = exc
                if len(self.servers) > 1:
                    log.warning("EST %s: %s; trying the next server", exc.url, exc.why)
                continue
            if index != self._current:
                log.info("EST: now using %s", server.url)
                self._current = index
            return response
        assert failed is not None
        raise failed

    async def _request(
        self,
        server: EstServer,
        method: str,
        path: str,
        ctx: ssl.SSLContext,
        headers: dict[str, str] | None,
        body: bytes,
    ) -> http11.HttpResponse:
        url = self._url(path, server)
        all_headers = {"User-Agent": f"fleetpki-agent/{__version__}", **(headers or {})}
        try:
            async with asyncio.timeout(self.timeout):
                response = await http11.request(
                    method,
                    server.host,
                    server.port,
                    path,
                    ctx,
                    headers=all_headers,
                    body=body,
                )
        except ssl.SSLCertVerificationError as exc:
            raise TlsVerificationFailed(url, exc.verify_message or str(exc)) from exc
        except TimeoutError as exc:
            raise EstUnavailable(url, f"no answer within {self.timeout:.0f} s") from exc
        except (OSError, http11.HttpError) as exc:
            raise EstUnavailable(url, str(exc) or type(exc).__name__) from exc
        self.last_server_date = parse_http_date(response.header("date")) or self.last_server_date
        return response

    def _certs(self, response: http11.HttpResponse, operation: str) -> list[x509.Certificate]:
        """Map an EST answer to certificates or to the error it means (RFC 7030 4.2.3)."""
        url = self._url(self.server.path(operation))
        if response.status == 200:
            try:
                return decode_certs_only(
                    response.body, response.header("content-transfer-encoding")
                )
            except WireError as exc:
                raise EstProtocolError(url, exc.why) from exc
        if response.status == 202:
            now = datetime.now(UTC)  # the header may be an absolute date; entry-point clock
            raise EstRetryLater(url, parse_retry_after(response.header("retry-after"), now))
        raise _refusal(response, url)

    async def cacerts(self) -> list[x509.Certificate]:
        """GET /cacerts (RFC 7030 4.1): the CA certificates; the caller checks them against the
        trust anchor (the TLS connection already did for the server's own chain)."""
        ctx = client_context(self.trust_anchor)
        return self._certs(await self._call("GET", self.server.path("cacerts"), ctx), "cacerts")

    async def device_status(self, cert_path: Path, key_path: Path) -> dict[str, object]:
        """GET /device/status over mTLS with the current certificate: the service's word on
        whether this device may act. Returns the 200 answer ({"device", "state": "active",
        ...}); a suspended device raises DeviceSuspended, a revoked one DeviceRevoked, any
        other refusal EstRejected (README, "Wire contract")."""
        ctx = client_context(self.trust_anchor, cert_path, key_path)
        path = self.server.device_status_path
        response = await self._call("GET", path, ctx, {"Accept": "application/json"})
        if response.status != 200:
            raise _refusal(response, self._url(path))
        try:
            answer = json.loads(response.body)
        except ValueError as exc:
            raise EstProtocolError(self._url(path), f"device status is not JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise EstProtocolError(self._url(path), "device status is not a JSON object")
        return answer

    async def server_date(self) -> datetime | None:
        """The server's Date header, fetched while our clock is not yet trustworthy.

        A hint for the log only: the connection still verifies the chain and the host name
        against the trust anchor, but cannot check validity periods with a 1970 clock.
        """
        ctx = client_context(self.trust_anchor, check_time=False)
        try:
            await self._call("GET", self.server.path("cacerts"), ctx)
        except (EstUnavailable, TlsVerificationFailed):
            return None
        return self.last_server_date

    async def simpleenroll(
        self, csr: x509.CertificateSigningRequest, device_id: DeviceId, token: str
    ) -> list[x509.Certificate]:
        """POST /simpleenroll (RFC 7030 4.2.1), authenticated with HTTP Basic (RFC 7030 3.2.3):
        user = device id, password = the one-time token."""
        credentials = base64.b64encode(f"{device_id}:{token}".encode()).decode("ascii")
        headers = {
            "Content-Type": "application/pkcs10",
            "Content-Transfer-Encoding": "base64",
            "Authorization": f"Basic {credentials}",
        }
        ctx = client_context(self.trust_anchor)
        response = await self._call(
            "POST", self.server.path("simpleenroll"), ctx, headers, encode_csr(csr)
        )
        return self._certs(response, "simpleenroll")

    async def simpleenroll_idevid(
        self, csr: x509.CertificateSigningRequest, cert_path: Path, key_path: Path
    ) -> list[x509.Certificate]:
        """POST /simpleenroll (RFC 7030 4.2.1) authenticated by the factory birth certificate
        in the TLS handshake (RFC 7030 3.3.2: certificate-based client authentication; the
        IDevID-to-LDevID step of IEEE 802.1AR / BRSKI), with no HTTP Basic credentials."""
        headers = {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
        ctx = client_context(self.trust_anchor, cert_path, key_path)
        response = await self._call(
            "POST", self.server.path("simpleenroll"), ctx, headers, encode_csr(csr)
        )
        return self._certs(response, "simpleenroll")

    async def simplereenroll(
        self, csr: x509.CertificateSigningRequest, cert_path: Path, key_path: Path
    ) -> list[x509.Certificate]:
        """POST /simplereenroll (RFC 7030 4.2.2), authenticated by the current certificate."""
        headers = {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
        ctx = client_context(self.trust_anchor, cert_path, key_path)
        response = await self._call(
            "POST", self.server.path("simplereenroll"), ctx, headers, encode_csr(csr)
        )
        return self._certs(response, "simplereenroll")


# The refusals the agent acts on, by their wire code (never by the prose of the reason).
_REFUSALS: dict[str, type[EstRejected]] = {
    ErrorCode.DEVICE_REVOKED: DeviceRevoked,
    ErrorCode.DEVICE_SUSPENDED: DeviceSuspended,
}


def _refusal(response: http11.HttpResponse, url: str) -> EstError:
    """The error a non-2xx answer means: 5xx and 429 are worth retrying; a 4xx is a refusal,
    of the class its `Fleetpki-Error` code names."""
    status, reason = response.status, _reason(response)
    if 500 <= status <= 599 or status == 429:
        return EstUnavailable(url, f"HTTP {status}: {reason}", status)
    if 400 <= status <= 499:
        code = response.header(ERROR_HEADER)
        return _REFUSALS.get(code or "", EstRejected)(url, status, reason, code)
    return EstProtocolError(url, f"unexpected HTTP status {status}: {reason}")


def _reason(response: http11.HttpResponse) -> str:
    """The server's one-line reason (text/plain body), or the status phrase."""
    text = response.body.decode("utf-8", "replace").strip().splitlines()
    line = text[0] if text else response.reason or f"HTTP {response.status}"
    return line[:_REASON_MAX]
