"""Broker counters and their Prometheus text exposition (format 0.0.4)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


def _label(value: str) -> str:
    # Prometheus text format: backslash, double quote and newline are escaped in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class BrokerMetrics:
    """Monotonic counters; gauges (connected identities) are read from the broker when rendered."""

    accepted: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)
    acl_denials: Counter[str] = field(default_factory=Counter)
    tls_handshake_failures: int = 0
    # False when the lean TLS protocol (private asyncio interface) failed its start-up probe.
    tls_fast_path: bool = True

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def dropped(self, reason: str) -> None:
        self.drops[reason] += 1

    def denied(self, action: str) -> None:
        self.acl_denials[action] += 1

    def render(self, connected_by_role: Mapping[str, int]) -> str:
        lines = [
            "# HELP fleetpki_broker_connected_clients Identities with a live MQTT session.",
            "# TYPE fleetpki_broker_connected_clients gauge",
        ]
        for role in sorted({"device", "service", *connected_by_role}):
            lines.append(
                f'fleetpki_broker_connected_clients{{role="{_label(role)}"}} '
                f"{connected_by_role.get(role, 0)}"
            )
        lines += [
            "# HELP fleetpki_broker_connections_accepted_total CONNECTs admitted.",
            "# TYPE fleetpki_broker_connections_accepted_total counter",
            f"fleetpki_broker_connections_accepted_total {self.accepted}",
            "# HELP fleetpki_broker_connections_refused_total CONNECTs refused, by reason.",
            "# TYPE fleetpki_broker_connections_refused_total counter",
        ]
        for reason, n in sorted(self.refusals.items()):
            lines.append(
                f'fleetpki_broker_connections_refused_total{{reason="{_label(reason)}"}} {n}'
            )
        lines += [
            "# HELP fleetpki_broker_tls_handshake_failures_total TLS handshakes that failed "
            "(no, foreign, expired or wrong-purpose client certificate, or not TLS at all).",
            "# TYPE fleetpki_broker_tls_handshake_failures_total counter",
            f"fleetpki_broker_tls_handshake_failures_total {self.tls_handshake_failures}",
            "# HELP fleetpki_broker_tls_fast_path 1 when the lean TLS protocol serves the "
            "listener, 0 when its start-up probe failed and asyncio's standard one does.",
            "# TYPE fleetpki_broker_tls_fast_path gauge",
            f"fleetpki_broker_tls_fast_path {int(self.tls_fast_path)}",
            "# HELP fleetpki_broker_sessions_dropped_total Live sessions the broker ended, by "
            "reason.",
            "# TYPE fleetpki_broker_sessions_dropped_total counter",
        ]
        for reason, n in sorted(self.drops.items()):
            lines.append(f'fleetpki_broker_sessions_dropped_total{{reason="{_label(reason)}"}} {n}')
        lines += [
            "# HELP fleetpki_broker_acl_denials_total Publishes and subscriptions refused by the "
            "topic policy.",
            "# TYPE fleetpki_broker_acl_denials_total counter",
        ]
        for action, n in sorted(self.acl_denials.items()):
            lines.append(f'fleetpki_broker_acl_denials_total{{action="{_label(action)}"}} {n}')
        return "\n".join(lines) + "\n"
