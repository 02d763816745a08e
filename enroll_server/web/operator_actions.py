"""What an operator's action does in a running server, whichever door it came through (the
admin API's JSON or the web console's forms): the registry write off the event loop, then the
live effects (the broker drops the session at once, the CRL is rebuilt, the token index looks
again). Each raises the registry's and provisioning's own errors; the doors translate them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from enroll_server.errors import Conflict
from enroll_server.home.layout import LoadedHome
from enroll_server.registry import Registry, parse_reason
from enroll_server.web.provisioner import (
    CreatedBatch,
    NewToken,
    Progress,
    Provisioner,
    TokenPurpose,
)
from enroll_server.web.state import AppState
from fleetpki.identity import DeviceId

T = TypeVar("T")


class Transition(StrEnum):
    """The state changes an operator makes to a device (CLI: fleetpki device revoke|...)."""

    REVOKE = "revoke"
    SUSPEND = "suspend"
    RESUME = "resume"


async def off_the_loop(st: AppState, job: Callable[[Registry], T]) -> T:
    """Run an operator's registry write in a worker thread, on a connection of its own, so
    the server goes on serving meanwhile: a batch of 100,000 devices takes seconds, and any
    write may wait up to the busy timeout for a lock another process holds. WAL readers never
    wait for the writer, and the enrollment commit waits for the lock without blocking the
    loop (commit_queue); on the loop's own connection its lock would hold every request."""

    def run() -> T:
        with Registry.open(st.registry.location) as registry:
            return job(registry)

    return await asyncio.to_thread(run)


async def _drop_sessions(st: AppState, device_id: DeviceId, why: str) -> None:
    for hook in st.on_revocation:
        result = hook(device_id.value, why)
        if hasattr(result, "__await__"):
            await result


async def change_device_state(
    st: AppState, device_id: DeviceId, action: Transition, *, reason: str, actor: str
) -> list[int]:
    """Revoke (with `reason`, an RFC 5280 name or its kebab spelling), suspend or resume a
    device; its live broker session is dropped in-process at once. The serials affected."""
    now = st.clock()
    if action is Transition.REVOKE:
        rfc_reason = parse_reason(reason)
        serials = await off_the_loop(
            st, lambda r: r.revoke_device(device_id, reason=rfc_reason, now=now, actor=actor)
        )
    elif action is Transition.SUSPEND:
        serials = await off_the_loop(
            st, lambda r: r.suspend_device(device_id, now=now, actor=actor)
        )
    else:
        serials = await off_the_loop(st, lambda r: r.resume_device(device_id, now=now, actor=actor))
    if action is not Transition.RESUME:
        await _drop_sessions(
            st, device_id, "revoked" if action is Transition.REVOKE else "suspended"
        )
    st.on_registry_change()
    return serials


async def revoke_certificate(
    st: AppState, serial: int, *, reason: str, actor: str
) -> tuple[DeviceId, list[int]]:
    """Revoke one certificate; its identity stays registered (the broker's registry event
    poll drops a session presenting it)."""
    now = st.clock()
    why = parse_reason(reason)
    result = await off_the_loop(
        st, lambda r: r.revoke_certificate(serial, reason=why, now=now, actor=actor)
    )
    st.on_registry_change()
    return result


def provisioning(st: AppState) -> tuple[LoadedHome, Provisioner]:
    """The home and the operator tooling the batch and token actions need (Conflict without)."""
    if st.home is None:
        raise Conflict("this server has no home folder to provision from")
    if st.provisioner is None:
        raise Conflict("this server was started without the operator tooling (provisioning)")
    return st.home, st.provisioner


async def new_device_token(
    st: AppState,
    device_id: DeviceId,
    purpose: TokenPurpose,
    *,
    ttl: timedelta | None,
    actor: str,
) -> NewToken:
    """A new one-time enrollment token for a device (reissue, re-key, readmit): the clear
    token is in the result only."""
    (home, provisioner), now = provisioning(st), st.clock()
    result = await off_the_loop(
        st,
        lambda registry: provisioner.new_token(
            registry, home, device_id, purpose=purpose, ttl=ttl, now=now, actor=actor
        ),
    )
    st.on_registry_change()
    return result


async def create_token_batch(
    st: AppState,
    *,
    count: int,
    prefix: str,
    token_ttl: timedelta | None,
    actor: str,
    batch_id: str | None = None,
    note: str = "",
    out_dir: Path | None = None,
    progress: Progress | None = None,
) -> CreatedBatch:
    """A factory batch of `count` token devices: bundles in `out_dir`, or (None) the clear
    tokens in the result only. The token index reads the new tokens at once."""
    (home, provisioner), now = provisioning(st), st.clock()
    result = await off_the_loop(
        st,
        lambda registry: provisioner.create_batch(
            registry,
            home,
            count=count,
            prefix=prefix,
            token_ttl=token_ttl,
            now=now,
            actor=actor,
            batch_id=batch_id,
            note=note,
            out_dir=out_dir,
            progress=progress,
        ),
    )
    if st.service.tokens is not None:
        st.service.tokens.unknown_token_seen()  # read the batch's tokens now, not at first use
    return result


async def revoke_batch(
    st: AppState,
    batch_id: str,
    *,
    reason: str,
    actor: str,
) -> int:
    """Revoke every device of a batch; the broker drops their sessions (registry events)."""
    now = st.clock()
    rfc_reason = parse_reason(reason)
    count = await off_the_loop(
        st,
        lambda registry: registry.revoke_batch(batch_id, reason=rfc_reason, now=now, actor=actor),
    )
    st.on_registry_change()
    return count
