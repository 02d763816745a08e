"""Revocation for several live issuing CAs (after `fleetpki ca rollover`, home.issuers).

Each issuer has its own RevocationState: its own CRL, listing only its certificates, signed
by it, with the Issuing Distribution Point its certificates' CDP names (RFC 5280 5.2.5), and
its own OCSP responder. `/crl` serves the first issuer's CRL (the URL in certificates from
before any rollover) while that issuer lives, the current issuer's after; `/crl/<id>` each
live issuer's. OCSP requests go to the issuer their CertID names (RFC 6960 4.1.1
issuerNameHash + issuerKeyHash); a CertID no live issuer matches gets the current issuer's
answer (unauthorized, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from cryptography.x509 import ocsp

from enroll_server.pki.ocsp import MalformedOcspRequest, OcspReply, decode_get_request
from enroll_server.revocation.publisher import PublishedCrl
from enroll_server.revocation.state import RevocationState

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("fleetpki.revocation")


class IssuerRevocation:
    """The RevocationState of every live issuing CA, by id (home.issuers.key_id)."""

    def __init__(self, current_id: str, current: RevocationState, route: str) -> None:
        self.outcomes: Counter[str] = current.outcomes
        self._states: dict[str, RevocationState] = {}
        self._routes: dict[str, str] = {}
        self._wake: asyncio.Event | None = None
        self.current_id = current_id
        self.add(current_id, current, route)

    @property
    def current(self) -> RevocationState:
        return self._states[self.current_id]

    def ids(self) -> list[str]:
        return list(self._states)

    def get(self, kid: str) -> RevocationState | None:
        return self._states.get(kid)

    def add(self, kid: str, state: RevocationState, route: str) -> None:
        """A live issuer's state, served at `/<route>` (home.issuers.crl_route)."""
        state.outcomes = self.outcomes
        self._states[kid] = state
        self._routes[route] = kid
        self._routes[f"crl/{kid}"] = kid
        self.changed()

    def remove(self, kid: str) -> None:
        """An issuer retired or revoked: its CRL and OCSP are no longer served."""
        self._states.pop(kid, None)
        self._routes = {r: k for r, k in self._routes.items() if k != kid}

    def by_route(self, route: str) -> RevocationState | None:
        kid = self._routes.get(route)
        if kid is None and route == "crl":
            kid = self.current_id  # the first issuer retired: /crl is the current one's
        return None if kid is None else self._states.get(kid)

    # ------------------------------------------------ what revocation_routes calls

    def crl(self) -> PublishedCrl:
        state = self.by_route("crl")
        assert state is not None
        return state.crl()

    def changed(self) -> None:
        """Wake the refresh task now (a revocation in this process, an issuer added)."""
        if self._wake is not None:
            self._wake.set()

    def _for_request(self, der: bytes) -> RevocationState:
        try:
            request = ocsp.load_der_ocsp_request(der)
            algorithm = request.hash_algorithm
            name_hash, key_hash = request.issuer_name_hash, request.issuer_key_hash
        except Exception:
            return self.current
        for state in self._states.values():
            responder = state.responder(state.clock())
            if responder.is_authoritative(algorithm, name_hash, key_hash):
                return state
        return self.current

    def answer(self, request_der: bytes) -> OcspReply:
        return self._for_request(request_der).answer(request_der)

    def answer_get(self, encoded: str) -> OcspReply:
        try:
            der = decode_get_request(encoded)
        except MalformedOcspRequest:
            return self.current.answer_get(encoded)
        return self._for_request(der).answer_get(encoded)

    # ------------------------------------------------ lifetime

    async def run(self) -> None:
        """Refresh every issuer's CRL, one after the other (they share the publisher's registry
        connection), when woken (changed) or every poll interval; until cancelled."""
        self._wake = asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.current.poll_interval)
            self._wake.clear()
            for kid, state in list(self._states.items()):
                try:
                    await asyncio.to_thread(state.refresh)
                except Exception:
                    log.exception("CRL refresh of issuing CA %s failed; still serving", kid)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        for state in list(self._states.values()):
            await asyncio.to_thread(state.crl)
        task = asyncio.create_task(self.run(), name="fleetpki-crl-refresh")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def attach(self, app: web.Application) -> None:
        """Build each issuer's first CRL when `app` starts and keep them fresh while it runs."""
        app.cleanup_ctx.append(self._lifecycle)


def crl_route_handler(
    revocations: IssuerRevocation,
    respond: Callable[[web.Request, PublishedCrl, bool], web.Response],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /crl/{id} and /crl/{id}.pem: that live issuer's CRL; 404 for an unknown id."""
    from aiohttp import web

    async def get(request: web.Request) -> web.Response:
        name = request.match_info["issuer"]
        pem = name.endswith(".pem")
        kid = name.removesuffix(".pem")
        state = revocations.by_route(f"crl/{kid}")
        if state is None:
            raise web.HTTPNotFound(text=f"no live issuing CA {kid}\n")
        return respond(request, state.crl(), pem)

    return get
