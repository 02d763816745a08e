"""Indexed fan-out finds exactly the filters a full scan (and amqtt's own matcher) finds."""

from __future__ import annotations

import itertools
import random

import pytest

from enroll_server.broker.fanout import (
    candidate_count,
    candidate_filters,
    filter_matches,
    matching_filters,
)

LEVELS = ["devices", "dev1", "dev2", "telemetry", "commands", "$SYS", "a", ""]


def _amqtt_matches(topic: str, a_filter: str) -> bool:
    """amqtt 0.12.1 Broker._matches, verbatim logic (the reference we must agree with)."""
    if topic.startswith("$") and (a_filter.startswith(("+", "#"))):
        return False
    if "#" not in a_filter and "+" not in a_filter:
        return a_filter == topic
    sub_levels = a_filter.split("/")
    pub_levels = topic.split("/")
    for i, level in enumerate(sub_levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#":
            return i == len(sub_levels) - 1
        if i >= len(pub_levels) or level not in ("+", pub_levels[i]):
            return False
    return len(sub_levels) == len(pub_levels)


def _topics(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        depth = rng.randint(1, 4)
        out.append("/".join(rng.choice(LEVELS) for _ in range(depth)))
    return out


def _filters(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        depth = rng.randint(1, 4)
        levels = [rng.choice([*LEVELS, "+", "+"]) for _ in range(depth)]
        if rng.random() < 0.3:
            levels[-1] = "#"
        out.append("/".join(levels))
    return out


def test_candidates_are_exactly_the_matching_filters() -> None:
    topic = "devices/dev1/telemetry"
    candidates = list(candidate_filters(topic))
    assert len(candidates) == len(set(candidates)) == candidate_count(topic) == 23
    assert {"#", "devices/#", "devices/+/telemetry", "+/+/+", "devices/dev1/telemetry/#"} <= set(
        candidates
    )
    assert all(filter_matches(f, topic) for f in candidates)


def test_dollar_topics_have_no_leading_wildcard_candidates() -> None:
    candidates = set(candidate_filters("$SYS/broker/load"))
    assert "#" not in candidates and "+/broker/load" not in candidates
    assert "$SYS/#" in candidates and "$SYS/+/load" in candidates


@pytest.mark.parametrize("seed", range(5))
def test_indexed_lookup_agrees_with_a_scan_and_with_amqtt(seed: int) -> None:
    rng = random.Random(seed)
    stored = dict.fromkeys(_filters(rng, 300), object())
    for topic in _topics(rng, 200):
        scan = {f for f in stored if _amqtt_matches(topic, f)}
        assert set(matching_filters(topic, stored)) == scan, topic
        small = dict(itertools.islice(stored.items(), 5))  # scan path
        assert set(matching_filters(topic, small)) == {f for f in small if _amqtt_matches(topic, f)}
