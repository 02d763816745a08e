"""What a lifecycle command (revoke, suspend, resume) did, in the words the CLI prints."""

from __future__ import annotations

from enroll_server.registry import DeviceState


def transition_outcome(action: str, before: DeviceState, serials: list[int]) -> str:
    """What `device revoke|suspend|resume` did, in words: a repeat says "nothing to do"."""
    n = f"{len(serials)} certificate(s)"
    if action == "revoke":
        if before is DeviceState.REVOKED and not serials:
            return "already revoked: nothing to do (any live session is dropped again)"
        return f"revoked: {n} revoked, its live sessions are dropped"
    if action == "suspend":
        if before is DeviceState.SUSPENDED:
            return "already suspended: nothing to do"
        return f"suspended: {n} on hold, its live sessions are dropped; `device resume` lifts it"
    if before is not DeviceState.SUSPENDED:
        return f"not suspended (state {before.value}): nothing to do"
    return f"resumed: {n} taken off hold; the device may connect again"
