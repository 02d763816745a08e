"""mosquitto's acl_file, rendered from the one topic rule table (fleetpki.topics.RULES).

mosquitto.conf(5), "acl_file": `pattern` lines apply to every user, with %u replaced by the
username (here the client certificate's CN: a device id or a service name); `topic` lines
apply to the user named by the `user` line above them. So device rules, which speak of the
identity's own id, become `pattern` lines, and each service identity gets a `user` block with
the service rules. A pattern line applies to services too: a service named S may also use
devices/S/#, a subtree no device can own (devices and services share one namespace of ids).
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetpki.identity import DeviceId
from fleetpki.topics import OWN_ID, RULES, Access, Role, TopicRule

_USERNAME = "%u"


def _access_word(accesses: set[Access]) -> str:
    if accesses == {Access.PUBLISH, Access.SUBSCRIBE}:
        return "readwrite"
    return "write" if Access.PUBLISH in accesses else "read"


def _grouped(rules: Iterable[TopicRule]) -> list[tuple[str, str]]:
    """(access word, pattern) per distinct pattern, in rule order."""
    by_pattern: dict[str, set[Access]] = {}
    for rule in rules:
        by_pattern.setdefault(rule.pattern, set()).add(rule.access)
    return [(_access_word(accesses), pattern) for pattern, accesses in by_pattern.items()]


def render_acl(services: Iterable[str] = ()) -> str:
    """The acl_file: device rules as `pattern` lines, one `user` block per service name."""
    lines = [
        "# Written by fleetpki (broker mosquitto-config, kept current by mosquitto-sync) from",
        "# fleetpki.topics.RULES, the rules the embedded broker applies. Do not edit.",
        "# Devices: %u is the CN of the client certificate, i.e. the device id.",
    ]
    for word, pattern in _grouped(r for r in RULES if r.role is Role.DEVICE):
        lines.append(f"pattern {word} {pattern.replace(OWN_ID, _USERNAME)}")
    service_rules = _grouped(r for r in RULES if r.role is Role.SERVICE)
    for name in sorted(set(services)):
        # A valid id has no spaces, newlines or wildcards: safe on a `user` line.
        service = DeviceId(name).value
        lines += ["", f"user {service}"]
        lines += [
            f"topic {word} {pattern.replace(OWN_ID, service)}" for word, pattern in service_rules
        ]
    return "\n".join(lines) + "\n"
