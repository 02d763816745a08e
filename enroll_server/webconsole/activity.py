"""The overview's 24-hour activity: audit entries and refusals counted per hour, and the
geometry of the bar chart the page draws as SVG (pure: rows and times in, numbers out)."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

HOURS = 24
# Audit actions the chart counts, and under which series.
ISSUE_ACTION = "certificate.issue"
# A batch revocation writes a device.revoke entry per device (and one batch.revoke summary).
REVOCATION_ACTIONS = ("device.revoke", "certificate.revoke")
CHART_ACTIONS = (ISSUE_ACTION, *REVOCATION_ACTIONS)
SERIES = ("enrollments", "renewals", "refusals", "revocations")


def hour_floor(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def series_of(action: str, detail_json: str) -> str | None:
    """Which series an audit entry counts in: an issuance that supersedes a certificate is a
    renewal (EST simplereenroll), any other a first enrollment."""
    if action == ISSUE_ACTION:
        detail = json.loads(detail_json)
        return "renewals" if detail.get("supersedes") else "enrollments"
    if action in REVOCATION_ACTIONS:
        return "revocations"
    return None


@dataclass(frozen=True, slots=True)
class HourCounts:
    start: datetime
    counts: dict[str, int]


def hourly(
    rows: list[tuple[datetime, str, str]], refusals: dict[datetime, int], now: datetime
) -> list[HourCounts]:
    """The last 24 hours (the current one last), each with its count per series."""
    first = hour_floor(now) - timedelta(hours=HOURS - 1)
    hours = [HourCounts(first + timedelta(hours=i), dict.fromkeys(SERIES, 0)) for i in range(HOURS)]
    for at, action, detail in rows:
        index = int((at - first).total_seconds() // 3600)
        series = series_of(action, detail)
        if series is not None and 0 <= index < HOURS:
            hours[index].counts[series] += 1
    for start, count in refusals.items():
        index = int((start - first).total_seconds() // 3600)
        if 0 <= index < HOURS:
            hours[index].counts["refusals"] += count
    return hours


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: str
    count: int
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    bars: tuple[Bar, ...]
    peak: int
    labels: tuple[tuple[float, str], ...]  # (x, "HH:00") under every sixth hour
    totals: dict[str, int]


def chart(hours: list[HourCounts], *, width: int = 720, height: int = 160) -> Chart:
    """Grouped bars: per hour, one thin bar per series, scaled to the busiest hour."""
    peak = max([1, *(n for h in hours for n in h.counts.values())])
    slot = width / len(hours)
    bar_w = slot / (len(SERIES) + 1)
    bars = []
    for i, hour in enumerate(hours):
        for j, series in enumerate(SERIES):
            count = hour.counts[series]
            h = (height - 20) * count / peak
            bars.append(
                Bar(
                    x=round(i * slot + j * bar_w, 2),
                    y=round(height - 20 - h, 2),
                    width=round(bar_w, 2),
                    height=round(h, 2),
                    series=series,
                    count=count,
                    title=f"{hour.start:%H}:00 {series}: {count}",
                )
            )
    labels = tuple(
        (round(i * slot, 2), f"{h.start:%H}:00") for i, h in enumerate(hours) if i % 6 == 0
    )
    totals = {s: sum(h.counts[s] for h in hours) for s in SERIES}
    return Chart(width, height, tuple(bars), peak, labels, totals)


@dataclass
class RefusalCounter:
    """Refused enrollments per hour, from the service's own counter (metrics: the
    enrollments rejected_* labels), sampled by the console. Refusals are not in the registry:
    these cover the time since this process started, and the page says so."""

    _last_total: int | None = None
    _per_hour: deque[tuple[datetime, int]] = field(default_factory=lambda: deque(maxlen=HOURS + 1))

    def sample(self, total: int, now: datetime) -> None:
        delta = 0 if self._last_total is None else max(0, total - self._last_total)
        self._last_total = total
        hour = hour_floor(now)
        if self._per_hour and self._per_hour[-1][0] == hour:
            self._per_hour[-1] = (hour, self._per_hour[-1][1] + delta)
        else:
            self._per_hour.append((hour, delta))

    def per_hour(self) -> dict[datetime, int]:
        return dict(self._per_hour)


def refused_total(values: dict[str, int]) -> int:
    """The sum of the enrollments counter's rejected_<status> labels."""
    return sum(n for label, n in values.items() if label.startswith("rejected_"))
