"""Issue 15: kill -9 of node A in the middle of an enrollment storm. Two `fleetpki serve` nodes
(`fleetpki node add`) on one PostgreSQL registry; token enrollers, mTLS renewers and real agents
whose bundles name both nodes (tests/storm.py). Node A, the one holding the most agents' MQTT
sessions, is killed with SIGKILL and not restarted: the agents move to node B by themselves,
clients carry on at node B, every certificate any client received is in the registry with the
right status, and no token produced two certificates."""

from __future__ import annotations

from pathlib import Path

from tests.pg_cluster import PASSWORD
from tests.storm import Node, Storm, StormConfig, make_nodes, run_campaign


def _busiest(up: list[Node], storm: Storm) -> Node:
    return max(up, key=lambda node: len(storm.agents_on(node)))


def test_kill_9_of_node_a_in_an_enrollment_storm_agents_move_to_node_b(
    tmp_path: Path, pg_url: str
) -> None:
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    nodes = make_nodes(tmp_path, 2, registry=bare, registry_password=PASSWORD)
    config = StormConfig(enrollers=4, renewers=3, agents=4, tokens=300)
    try:
        campaign, storm = run_campaign(
            nodes,
            tmp_path,
            config,
            kills=1,
            seed=15,
            gap=(0.5, 1.5),
            restart=False,
            agents_first=True,
            victim=_busiest,
        )
    finally:
        for node in nodes:
            node.stop()
    summary = campaign.summary(storm.ledger, storm)
    assert campaign.violations == [], (summary, campaign.violations[:20])
    (kill,) = campaign.kills
    survivor = next(node for node in nodes if node.name != kill.node)
    # Agents were on node A when it died, and every agent ended on node B's broker.
    assert kill.agents_on > 0, summary
    assert summary["agents_back_s"] < 30, summary
    assert summary["in_flight_at_kills"] > 0, summary
    assert summary["certificates_checked"] == storm.ledger.certificates() > 10, summary
    # Node B served to the end and stopped cleanly when asked (SIGTERM, exit 0).
    assert survivor.proc is not None and survivor.proc.returncode == 0
