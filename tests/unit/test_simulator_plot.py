"""The simulator's timeline PNG reads at a glance: near-simultaneous marks (three devices
revoked at once) share one label, no two labels overlap, and coinciding series stay visible."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from simulators.plot import draw_timeline, mark_groups, plot_timeline
from simulators.report import build_report
from simulators.trace import Journal


def _revoke_report() -> object:
    journal = Journal()
    for i in range(20):
        t = journal.trace(f"sim-{i:06d}")
        t.started, t.enrolled, t.connects = 0.01 * i, 0.3 + 0.01 * i, [0.4 + 0.01 * i]
        if i < 3:
            t.disconnects = [2.52 + 0.01 * i]
    for i, at in enumerate((2.50, 2.51, 2.53)):
        journal.mark(at, f"revoke sim-{i:06d}")
    journal.mark(4.0, "broker stopped")
    journal.mark(4.3, "broker back")
    return build_report(journal, scenario="revoke", duration=6.0)


def test_near_simultaneous_marks_share_one_label() -> None:
    marks = [(2.50, "revoke a"), (2.51, "revoke b"), (2.53, "revoke c"), (4.0, "broker stopped")]
    assert mark_groups(marks, span=6.0) == [(2.50, "revoke (3): a, b, c"), (4.0, "broker stopped")]
    many = [(1.0 + 0.001 * i, f"revoke d{i}") for i in range(6)]
    assert mark_groups(many, span=6.0) == [(1.0, "revoke (6): d0, d1, d2, d3, +2")]


def test_labels_do_not_overlap_and_every_series_has_its_own_look(tmp_path: Path) -> None:
    report = _revoke_report()
    fig = draw_timeline(report)  # type: ignore[arg-type]
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        (ax,) = fig.axes
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) == 3  # one for the three revocations, one per broker mark
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not a.overlaps(b), (a, b)
        looks = {(line.get_linestyle(), line.get_linewidth()) for line in ax.get_lines()[:3]}
        assert len(looks) == 3  # enrolled, first connected, connected now: never hidden
        assert all(tick == int(tick) for tick in ax.get_yticks())  # devices come whole
    finally:
        plt.close(fig)
    out = plot_timeline(report, tmp_path / "t.png")  # type: ignore[arg-type]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
