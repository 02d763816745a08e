"""Fan-out: which stored subscription filters match a published topic, without a full scan."""

from __future__ import annotations

from collections.abc import Iterator


def candidate_filters(topic: str) -> Iterator[str]:
    """Every valid filter that matches `topic` (MQTT 3.1.1 section 4.7).

    Each level is either itself or '+', and a trailing '#' may replace any suffix, the empty
    one included ("a/#" matches "a", section 4.7.1.2). For a topic starting with '$' the first
    level is never a wildcard ([MQTT-4.7.2-1]). A topic of L levels has 2^L + 2^(L+1) - 1 such
    filters: 23 for devices/<id>/telemetry.
    """
    levels = topic.split("/")
    first_fixed = topic.startswith("$")

    def prefixes(k: int) -> Iterator[list[str]]:
        if k == 0:
            yield []
            return
        for head in prefixes(k - 1):
            yield [*head, levels[k - 1]]
            if not (k == 1 and first_fixed):
                yield [*head, "+"]

    for k in range(len(levels) + 1):
        for prefix in prefixes(k):
            if k == len(levels):
                yield "/".join(prefix)
            if not (k == 0 and first_fixed):
                yield "/".join([*prefix, "#"])


def candidate_count(topic: str) -> int:
    n = topic.count("/") + 1
    return 2**n + 2 ** (n + 1) - 1


def matching_filters(topic: str, stored: dict[str, object]) -> list[str]:
    """The keys of `stored` (subscription filters) that match `topic`.

    Looks each candidate filter up when that is fewer operations than scanning `stored`;
    a broker with one subscription per device would otherwise test every device's filter
    for every message.
    """
    if candidate_count(topic) < len(stored):
        return [f for f in candidate_filters(topic) if f in stored]
    return [f for f in stored if filter_matches(f, topic)]


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching of one filter against one topic name."""
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False  # [MQTT-4.7.2-1]
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return i == len(f_levels) - 1
        if i >= len(t_levels) or level not in ("+", t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)
