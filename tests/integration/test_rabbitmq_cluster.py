"""A three-node RabbitMQ cluster (join_cluster) from `rabbitmq-config`, answered by one
`fleetpki serve`: delivery across nodes, the client id bound on every node, a revocation
dropped wherever the session is, and every rule still holding with a node stopped.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enroll_server.broker.rabbitmq_auth_routes import SYNC_SECRET_FILE, read_secret
from enroll_server.broker.rabbitmq_config import RabbitFiles
from enroll_server.broker.rabbitmq_sync import Management, RabbitSync, read_cursor
from enroll_server.home.layout import load_home
from enroll_server.revocation.publisher import CrlPublisher
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet
from tests.integration.test_rabbitmq import Client, Tier, device, live_files, service
from tests.integration.test_revocation_mosquitto import _ca_of
from tests.live_server import LiveServer, start_live_server
from tests.rabbitmq_node import SERVER, RabbitNode, configure, free_port, stop_epmd

runner = CliRunner()


@dataclass
class Cluster:
    server: LiveServer
    fleet: Fleet
    files: RabbitFiles
    nodes: list[RabbitNode]
    folder: Path

    def on(self, index: int) -> Tier:
        """The cluster as seen through node `index` (its MQTT port)."""
        return Tier(self.server, self.fleet, self.files, self.nodes[index], self.folder)

    def sync(self) -> RabbitSync:
        password = read_secret(self.server.layout.root, SYNC_SECRET_FILE)
        assert password is not None
        ports = tuple(n.management_port for n in self.nodes)
        loaded = load_home(self.server.layout.root)
        publisher = CrlPublisher(
            self.fleet.registry, loaded.issuer, since_seq=read_cursor(self.files)
        )
        return RabbitSync(
            publisher, self.files, Management(ports, password), lambda: datetime.now(UTC)
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert SERVER.exists(), "rabbitmq-server is required (apt-get install rabbitmq-server)"
    folder = tmp_path_factory.mktemp("rabbitmq-cluster")
    server = start_live_server(folder / "home")
    epmd = free_port()
    nodes: list[RabbitNode] = []
    try:
        fleet = Fleet(_ca_of(load_home(server.layout.root)), server.registry, folder)
        conf = folder / "conf"
        ports = [(free_port(), free_port()) for _ in range(3)]
        configure(server.layout.root, conf, ports[0][0], ports[0][1], server.handle.admin_port)
        # One machine, three nodes: the same files, each its own ports.
        text = (conf / "rabbitmq.conf").read_text()
        for i, (mqtt_port, management_port) in enumerate(ports):
            own = folder / f"rabbitmq-{i}.conf"
            own.write_text(
                text.replace(f"127.0.0.1:{ports[0][0]}", f"127.0.0.1:{mqtt_port}").replace(
                    f"management.tcp.port = {ports[0][1]}",
                    f"management.tcp.port = {management_port}",
                )
            )
            nodes.append(
                RabbitNode(folder, conf, f"fpc{i}", mqtt_port, management_port, epmd, conf_file=own)
            )
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait()
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].node)
            node.ctl("start_app")
            node.wait()
        yield Cluster(server, fleet, RabbitFiles(conf), nodes, folder)
    finally:
        for node in nodes:
            node.signal(signal.SIGKILL)
        for node in nodes:
            node.stop(kill=True)
        stop_epmd(epmd)
        server.stop()


def test_cluster_delivers_across_nodes_and_binds_the_client_id_on_every_node(
    cluster: Cluster,
) -> None:
    status = cluster.nodes[0].ctl("cluster_status")
    assert all(n.node in status for n in cluster.nodes)
    for name in ("cl-1", "cl-victim", "cl-up"):
        device(cluster.on(0), name)
    watcher = service(cluster.on(2), "cl-svc")
    sender = Client(cluster.on(1), "cl-1", live_files(cluster.on(1), "cl-1"))
    assert sender.connect().accepted
    sender.publish("devices/cl-1/telemetry", b"across")
    sender.pump(0.3)
    watcher.pump(5, lambda: bool(watcher.messages))
    assert watcher.messages == [("devices/cl-1/telemetry", b"across")]
    # spoofed client id on node 2 while the victim is on node 0: refused, victim kept
    victim = Client(cluster.on(0), "cl-victim", live_files(cluster.on(0), "cl-victim"))
    assert victim.connect().accepted
    spoof = Client(cluster.on(2), "cl-victim", live_files(cluster.on(2), "cl-1"))
    assert spoof.connect().connack == 135  # CONNACK 5, not authorized
    victim.pump(1.0)
    assert not victim.closed
    for c in (victim, sender, watcher):
        c.close()


def _revoke_drops_within_1s(cluster: Cluster, node: int, name: str) -> None:
    files = device(cluster.on(node), name)
    sync = cluster.sync()
    stop = threading.Event()
    loop = threading.Thread(target=sync.run, args=(0.05, stop), daemon=True)
    loop.start()
    try:
        live = Client(cluster.on(node), name, files)
        assert live.connect().accepted
        started = time.monotonic()
        cluster.fleet.registry.revoke_device(
            DeviceId(name), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
        live.pump(3)
        took = time.monotonic() - started
        assert live.closed and took < 1.0, took
        assert not Client(cluster.on(node), name, files).connect().accepted
    finally:
        stop.set()
        loop.join(5)


def test_revoke_drops_the_session_on_the_node_that_holds_it(cluster: Cluster) -> None:
    _revoke_drops_within_1s(cluster, 2, "cl-rev")


def test_a_node_stopped_devices_reconnect_to_the_others_and_every_rule_holds(
    cluster: Cluster,
) -> None:
    cluster.nodes[2].stop(kill=True)
    for node in (0, 1):
        c = Client(cluster.on(node), "cl-up", live_files(cluster.on(node), "cl-up"))
        assert c.connect(timeout=10).accepted, node
        c.close()
    # still refused with a node down: spoofed id, another device's topic, a password
    victim = Client(cluster.on(0), "cl-up", live_files(cluster.on(0), "cl-up"))
    assert victim.connect().accepted
    assert (
        Client(cluster.on(1), "cl-up", live_files(cluster.on(1), "cl-1")).connect().connack == 135
    )
    victim.pump(1.0)
    assert not victim.closed
    snoop = Client(cluster.on(1), "cl-1", live_files(cluster.on(1), "cl-1"))
    assert snoop.connect().accepted
    snoop.subscribe("devices/cl-up/#")
    snoop.pump(3, lambda: bool(snoop.subacks))
    assert snoop.closed or snoop.subacks == [[128]]
    pw = Client(
        cluster.on(1), "cl-1", live_files(cluster.on(1), "cl-1"), password=("guest", "guest")
    )
    assert not pw.connect().accepted
    victim.close()
    # and a revocation still drops a live session within 1 s (node 2's management is down)
    _revoke_drops_within_1s(cluster, 1, "cl-rev2")
