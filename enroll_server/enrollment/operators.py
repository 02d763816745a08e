"""Operator credentials: issuing and rotating a named operator's token, and the one check
(a bearer token -> the operator, and what its role may do) behind every operator route: the
admin API, /metrics; the console's login can call `authenticate` too. Credentials are read
from the registry at every request, never cached, so a token rotated or removed by any
process is refused by every running server at its next request.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from enroll_server.errors import Forbidden, OperatorAuthenticationFailed
from enroll_server.home.layout import hash_secret, new_secret
from enroll_server.registry import (
    DuplicateOperator,
    Operator,
    OperatorCredential,
    OperatorRole,
    Registry,
)
from fleetpki.atomic_file import write_atomic

# The operator whose token is H/admin.token (written by init, rewritten by its rotation).
ADMIN_OPERATOR = "admin"

# RFC 9110 9.2.1: safe methods only read, so the viewer role may use them.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def authenticate(credentials: Iterable[OperatorCredential], token: str) -> Operator | None:
    """The operator whose token this is, or None. The token's SHA-256 is compared with every
    stored one in constant time, and all of them always, so neither the time to answer nor
    its order says anything about which hash, or how much of one, matched."""
    digest = hash_secret(token).encode()
    found: Operator | None = None
    for credential in credentials:
        if hmac.compare_digest(credential.token_hash.encode(), digest):
            found = credential.operator
    return found


def may(operator: Operator, method: str) -> bool:
    """Admins may do everything; viewers only read (GET, HEAD)."""
    return operator.role is OperatorRole.ADMIN or method.upper() in READ_METHODS


def operator_for(registry: Registry, authorization: str | None, method: str) -> Operator:
    """The operator an `Authorization: Bearer <token>` header (RFC 6750 2.1) authenticates,
    allowed to use `method`; OperatorAuthenticationFailed (401, Bearer challenge) or
    Forbidden (403) otherwise. The token never appears in an error or a log."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise OperatorAuthenticationFailed("needs 'Authorization: Bearer <operator token>'")
    operator = authenticate(registry.operator_credentials(), token)
    if operator is None:
        raise OperatorAuthenticationFailed("operator token is not valid", invalid_token=True)
    if not may(operator, method):
        raise Forbidden(f"operator {operator.name} has the {operator.role.value} role: read only")
    return operator


def add_operator(
    registry: Registry, name: str, role: OperatorRole, now: datetime, *, actor: str
) -> str:
    """Register a new operator; returns its token (256 random bits), which exists nowhere
    else: the registry keeps SHA-256 of it only."""
    token = new_secret()
    registry.add_operator(name, role, hash_secret(token), now, actor=actor)
    return token


def rotate_operator(registry: Registry, name: str, now: datetime, *, actor: str) -> str:
    """A new token for the operator; the old one is refused from the commit on, by every
    running server. Returns the new token."""
    token = new_secret()
    registry.rotate_operator(name, hash_secret(token), now, actor=actor)
    return token


def write_token_file(path: Path, token: str) -> None:
    """The token in a 0600 file, written atomically (never through a planted symlink)."""
    write_atomic(path, token.encode() + b"\n")


def set_admin_token(registry: Registry, token: str, now: datetime, *, actor: str) -> None:
    """Make `token` (the one init just wrote to H/admin.token) operator 'admin''s only token:
    registered if there is no such operator, its old token retired if there is (init --force
    on a home whose registry is kept)."""
    digest = hash_secret(token)
    if any(o.name == ADMIN_OPERATOR for o in registry.list_operators()):
        registry.rotate_operator(ADMIN_OPERATOR, digest, now, actor=actor)
    else:
        registry.add_operator(ADMIN_OPERATOR, OperatorRole.ADMIN, digest, now, actor=actor)


def bootstrap_admin(registry: Registry, token_file: Path, now: datetime, *, actor: str) -> bool:
    """A registry with no operator at all takes the token in `token_file` (H/admin.token) as
    operator 'admin': `init`, and homes made by init_home alone. Never otherwise: the registry
    is the authority, so a rewritten file is no new credential, and a removed operator does not
    come back (the last admin cannot be removed). True if it registered the token."""
    if registry.list_operators() or not token_file.exists():
        return False
    token = token_file.read_text().strip()
    try:
        registry.add_operator(
            ADMIN_OPERATOR, OperatorRole.ADMIN, hash_secret(token), now, actor=actor
        )
    except DuplicateOperator:
        return False  # another process bootstrapped it at the same moment
    return True
