"""A browser-like HTTP client for the web console (cookies, forms, CSRF tokens), built on
urllib: what tests use where a real browser would only be slower."""

from __future__ import annotations

import http.cookiejar
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
NONCE_FIELD = re.compile(r'name="nonce" value="([^"]+)"')


@dataclass
class Page:
    status: int
    headers: Message
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    def csrf(self) -> str:
        found = CSRF_FIELD.search(self.text)
        assert found, f"no CSRF field on the page: {self.text[:300]}"
        return found.group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class ConsoleClient:
    """One browser: its own cookie jar; redirects are returned, not followed."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext) -> None:
        self.base_url = base_url.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl_context),
            urllib.request.HTTPCookieProcessor(self.jar),
            _NoRedirect(),
        )

    def _open(self, request: urllib.request.Request) -> Page:
        try:
            with self.opener.open(request, timeout=30) as reply:
                return Page(reply.status, reply.headers, reply.read())
        except urllib.error.HTTPError as exc:
            return Page(exc.code, exc.headers, exc.read())

    def get(self, path: str, headers: dict[str, str] | None = None) -> Page:
        return self._open(urllib.request.Request(self.base_url + path, headers=headers or {}))

    def post(
        self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None
    ) -> Page:
        data = urllib.parse.urlencode(fields).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method="POST", headers=headers or {}
        )
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        return self._open(request)

    def login(self, token: str) -> Page:
        form = self.get("/console/login")
        nonce = NONCE_FIELD.search(form.text)
        assert nonce, form.text[:300]
        return self.post("/console/login", {"nonce": nonce.group(1), "token": token})

    def csrf(self) -> str:
        """The session's CSRF token, as any page's forms carry it."""
        return self.get("/console/").csrf()

    def submit(self, path: str, fields: dict[str, str]) -> Page:
        """A form POST as the page would send it (with the session's CSRF token)."""
        return self.post(path, {"csrf": self.csrf(), **fields})

    def cookie(self, name: str) -> http.cookiejar.Cookie | None:
        return next((c for c in self.jar if c.name == name), None)
