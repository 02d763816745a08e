"""RabbitMQ 3.10 as the broker tier: boot, connect, QoS 0 throughput, revocation to drop.

    .venv/bin/python bench/rabbitmq.py [--connects 100] [--revokes 20] [--messages 5000]

One node from `rabbitmq-config`, authorisation answered by a real `fleetpki serve` (HTTP auth
backend behind RabbitMQ's cache), `RabbitSync` polling every 50 ms. Prints a table and writes
bench/results/rabbitmq.json. Uses the test harness (tests/rabbitmq_node.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from enroll_server.broker.rabbitmq_config import RabbitFiles
from enroll_server.home.layout import load_home
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet
from tests.integration.test_rabbitmq import Client, Tier, device, service
from tests.integration.test_revocation_mosquitto import _ca_of
from tests.live_server import start_live_server
from tests.rabbitmq_node import RabbitNode, configure, free_port, stop_epmd


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=100)
    parser.add_argument("--revokes", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fleetpki-bench-rabbitmq-"))
    server = start_live_server(folder / "home")
    epmd = free_port()
    node = None
    results: dict[str, float] = {}
    try:
        fleet = Fleet(_ca_of(load_home(server.layout.root)), server.registry, folder)
        conf = folder / "conf"
        mqtt_port, management_port = free_port(), free_port()
        configure(server.layout.root, conf, mqtt_port, management_port, server.handle.admin_port)
        node = RabbitNode(folder, conf, "bench", mqtt_port, management_port, epmd)
        started = time.monotonic()
        node.start()
        results["boot_s"] = time.monotonic() - started
        tier = Tier(server, fleet, RabbitFiles(conf), node, folder)

        files = device(tier, "b-1")
        connects = []
        for _ in range(args.connects):
            t0 = time.monotonic()
            c = Client(tier, "b-1", files)
            assert c.connect().accepted
            connects.append((time.monotonic() - t0) * 1000)
            c.close()
        results["connect_p50_ms"] = statistics.median(connects)
        results["connect_p99_ms"] = pct(connects, 0.99)

        watcher = service(tier, "b-svc")
        sender = Client(tier, "b-1", files)
        assert sender.connect().accepted
        t0 = time.monotonic()
        for i in range(args.messages):
            sender.publish("devices/b-1/telemetry", b"%d" % i)
            if i % 100 == 0:
                sender.pump(0.001)
                watcher.pump(0.001)
        deadline = time.monotonic() + 30
        while len(watcher.messages) < args.messages and time.monotonic() < deadline:
            sender.pump(0.01)
            watcher.pump(0.01)
        took = time.monotonic() - t0
        results["qos0_received"] = len(watcher.messages)
        results["qos0_msgs_per_s"] = len(watcher.messages) / took
        sender.close()
        watcher.close()

        sync = tier.sync()
        stop = threading.Event()
        loop = threading.Thread(target=sync.run, args=(0.05, stop), daemon=True)
        loop.start()
        drops = []
        try:
            for i in range(args.revokes):
                name = f"r-{i}"
                live = Client(tier, name, device(tier, name))
                assert live.connect().accepted
                t0 = time.monotonic()
                fleet.registry.revoke_device(
                    DeviceId(name), reason="keyCompromise", now=datetime.now(UTC), actor="bench"
                )
                live.pump(3)
                assert live.closed
                drops.append((time.monotonic() - t0) * 1000)
        finally:
            stop.set()
            loop.join(5)
        results["revoke_to_drop_p50_ms"] = statistics.median(drops)
        results["revoke_to_drop_max_ms"] = max(drops)
    finally:
        if node is not None:
            node.stop(kill=True)
        stop_epmd(epmd)
        server.stop()
    for key, value in results.items():
        print(f"{key:24} {value:10.1f}")
    target = Path(__file__).parent / "results" / "rabbitmq.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps({"date": datetime.now(UTC).isoformat(), **results}, indent=1))


if __name__ == "__main__":
    main()
