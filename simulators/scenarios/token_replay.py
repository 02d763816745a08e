"""token-replay: factory tokens copied by an attacker are worthless once the devices enrolled."""

from __future__ import annotations

import random
import shutil
from typing import TYPE_CHECKING

from device_agent.errors import EstError, EstRejected
from device_agent.est_client import EstClient
from device_agent.est_wire import build_csr
from device_agent.keys import generate_key
from fleetpki.identity import DeviceId
from simulators.fleet import Fleet
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario
from simulators.trace import Journal, Outcome

if TYPE_CHECKING:
    from simulators.simulation import Simulation

VICTIMS = 5  # devices whose tokens are replayed (throttling starts at 20 failures/min/source)
REFUSED = (401, 429)  # wrong/used token, or throttled after too many of them


async def replay(sim: Simulation, device_id: str, token: str, as_id: str) -> tuple[bool, str]:
    """simpleenroll as `as_id` with `device_id`'s used token and a fresh key."""
    cfg = sim.local_fleet.agents[device_id].config
    client = EstClient(cfg.server, cfg.trust_anchor, timeout=10)
    key = generate_key(cfg.key_type)
    try:
        await client.simpleenroll(build_csr(key, DeviceId(as_id)), DeviceId(as_id), token)
    except EstRejected as exc:
        return exc.status in REFUSED, f"HTTP {exc.status}: {exc.reason}"
    except EstError as exc:
        return False, str(exc)
    return False, "a certificate was issued to the replay"


class TokenReplay(Scenario):
    name = "token-replay"
    in_process_only = "reads the agents' configuration to replay their tokens"
    summary = (
        "after the fleet enrolled, an attacker replays copied factory tokens: with the same "
        "id and a new key, under another device's id, and as a cloned agent; every replay is "
        "refused (401, then 429 when throttled), no certificate is issued to it, and the real "
        "devices stay connected"
    )

    async def run(self, sim: Simulation) -> Report:
        fleet, registry, bundles = sim.local_fleet, sim.registry, sim.bundle_dir
        assert fleet is not None and registry is not None and bundles is not None
        assert sim.folder is not None
        # The attacker copied the tokens at the factory, before any device used its own.
        tokens = {d: (bundles / d / "token").read_text().strip() for d in fleet.ids}
        checks = [await sim.bring_up()]
        ids = fleet.connected()
        victims = sorted(sim.rng.sample(ids, min(VICTIMS, len(ids))))
        start = sim.seconds()
        sim.journal.mark(start, "replays")

        results: list[tuple[bool, str]] = []
        for i, victim in enumerate(victims):
            results.append(await replay(sim, victim, tokens[victim], victim))
            other = ids[(ids.index(victim) + 1) % len(ids)]
            if other != victim:
                results.append(await replay(sim, victim, tokens[victim], other))
            if i == 0:
                results.append(await replay(sim, victim, "not-" + tokens[victim], victim))
        refused = [r for r in results if r[0]]
        statuses = sorted({why.split(":")[0] for _, why in results})
        checks.append(
            Check(
                "every replayed or guessed token refused",
                bool(results) and len(refused) == len(results),
                f"{len(refused)}/{len(results)} refused ({', '.join(statuses)})",
            )
        )

        # A clone: the victim's whole bundle (with the copied token) on another machine.
        clone_dir = sim.folder / "clones" / victims[0]
        shutil.copytree(bundles / victims[0], clone_dir, ignore=shutil.ignore_patterns("state"))
        (clone_dir / "token").write_text(tokens[victims[0]] + "\n")
        clones = Fleet(
            {victims[0]: clone_dir / "agent.toml"},
            Journal(),
            sim.seconds,
            fleet.settings,
            random.Random(sim.rng.random()),
        )
        clones.start_one(victims[0])
        await clones.wait_until(lambda: not clones.running(victims[0]), 30.0)
        await clones.stop()
        ct = clones.journal.trace(victims[0])
        checks.append(
            Check(
                "a cloned agent with the copied bundle is refused and stops",
                ct.outcome is Outcome.REFUSED and not ct.connects and ct.enrolled is None,
                f"state {ct.outcome}, {ct.reason or '-'}: {ct.detail or ''}".strip(),
            )
        )

        certs = {d: registry.certificates_of(DeviceId(d)) for d in victims}
        single = [
            d
            for d in victims
            if len(certs[d]) == 1
            and format(certs[d][0].serial, "x") == fleet.journal.trace(d).serials[-1]
        ]
        checks.append(
            Check(
                "no certificate issued to any replay",
                len(single) == len(victims),
                f"{len(single)}/{len(victims)} victims hold exactly their own one certificate",
            )
        )
        end = sim.seconds()
        disturbed = [d for d in ids if sim.journal.trace(d).disconnects_between(start, end)]
        checks.append(
            Check(
                "the real devices stay connected",
                not disturbed and len(fleet.connected(ids)) == len(ids),
                f"{len(fleet.connected(ids))}/{len(ids)} connected, {len(disturbed)} dropped",
            )
        )
        return await sim.finish(checks, extra={"victims": victims})
