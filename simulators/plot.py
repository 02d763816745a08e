"""The enroll/connect timeline as a PNG (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from simulators.errors import PlotUnavailable, SimulatorError
from simulators.report import Report


def check_plot_available() -> None:
    """Fail before a long run, not after it, if --plot cannot work here."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable


def _steps(times: list[float], end: float) -> tuple[list[float], list[int]]:
    """A cumulative count as step-plot points: 0 at t=0, +1 at each time, held to `end`."""
    xs, ys = [0.0], [0]
    for i, t in enumerate(sorted(times), start=1):
        xs.append(t)
        ys.append(i)
    xs.append(max(end, xs[-1]))
    ys.append(ys[-1])
    return xs, ys


def _connected_now(report: Report, end: float) -> tuple[list[float], list[int]]:
    """Live sessions over time: +1 at every connection, -1 at every disconnection."""
    tl = report.timeline
    # Events after `end` are the simulator's own teardown, not part of the story.
    changes = sorted(
        [(t, 1) for t in tl.connected + tl.reconnected if t <= end]
        + [(t, -1) for t in tl.disconnected if t <= end]
    )
    xs, ys, level = [0.0], [0], 0
    for t, delta in changes:
        level += delta
        xs.append(t)
        ys.append(level)
    xs.append(max(end, xs[-1]))
    ys.append(level)
    return xs, ys


# Marks closer than this share of the run are one event to the eye (three devices revoked in
# the same 50 ms): they get one line and one label, or their labels print over each other.
_MARK_MERGE = 0.02
_NAMES_SHOWN = 4


def mark_groups(marks: list[tuple[float, str]], span: float) -> list[tuple[float, str]]:
    """The scenario's marks as (time, label), near-simultaneous ones merged into one label:
    "revoke sim-000018", "revoke sim-000012" -> "revoke (2): sim-000018, sim-000012"."""
    groups: list[list[tuple[float, str]]] = []
    for t, what in sorted(marks):
        if groups and t - groups[-1][0][0] <= _MARK_MERGE * max(span, 1e-9):
            groups[-1].append((t, what))
        else:
            groups.append([(t, what)])
    labelled = []
    for group in groups:
        whats = [what for _, what in group]
        if len(whats) == 1:
            labelled.append((group[0][0], whats[0]))
            continue
        verbs = {w.split(" ", 1)[0] for w in whats}
        if len(verbs) == 1 and all(" " in w for w in whats):
            objects = [w.split(" ", 1)[1] for w in whats]
            more = f", +{len(objects) - _NAMES_SHOWN}" if len(objects) > _NAMES_SHOWN else ""
            label = f"{verbs.pop()} ({len(whats)}): {', '.join(objects[:_NAMES_SHOWN])}{more}"
        else:
            label = "; ".join(whats)
        labelled.append((group[0][0], label))
    return labelled


# Each series keeps its own look where they coincide (all devices enrolled, all connected):
# a wide pale line underneath, a dashed one over it, a thin solid one on top.
_SERIES_STYLE = {
    "enrolled": {"linewidth": 5.0, "alpha": 0.35, "linestyle": "-", "zorder": 2},
    "first connected": {"linewidth": 2.2, "alpha": 1.0, "linestyle": "--", "zorder": 3},
    "connected now": {"linewidth": 1.2, "alpha": 1.0, "linestyle": "-", "zorder": 4},
}


_LABEL_ROWS = 4


def _label_marks(fig: Any, ax: Any, groups: list[tuple[float, str]], end: float) -> None:
    """A dotted line per mark group and its label, horizontal above the curves, each on the
    first row (from the top) where it overlaps no label already placed."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for t, label in groups:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1, zorder=1)
        for row in range(_LABEL_ROWS):
            text = ax.annotate(
                label,
                (t, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3 if t < 0.6 * end else -3, -4 - 12 * row),
                textcoords="offset points",
                fontsize=7,
                va="top",
                ha="left" if t < 0.6 * end else "right",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
                zorder=5,
            )
            box = text.get_window_extent(renderer)
            if row == _LABEL_ROWS - 1 or not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()


def draw_timeline(report: Report) -> Any:
    """The timeline as a matplotlib Figure (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    end = report.duration
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    series = {
        "enrolled": _steps(report.timeline.enrolled, end),
        "first connected": _steps(report.timeline.connected, end),
        "connected now": _connected_now(report, end),
    }
    for label, (xs, ys) in series.items():
        ax.step(xs, ys, where="post", label=label, **_SERIES_STYLE[label])  # type: ignore[arg-type]
    top = max(report.devices, 1)
    ax.set_ylim(-0.04 * top, top * 1.3)  # headroom above the fleet for the labels
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # devices come whole
    _label_marks(fig, ax, mark_groups(report.timeline.marks, end), end)
    ax.set_xlim(0, max(end, 1e-9))
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("devices")
    ax.set_title(f"fleetpki simulate --scenario {report.scenario}: {report.devices:,} devices")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", framealpha=0.9)
    fig.tight_layout()
    return fig


def plot_timeline(report: Report, path: Path) -> Path:
    """Draw enrolled, first-connected and connected-now counts over time to a PNG."""
    check_plot_available()
    import matplotlib.pyplot as plt

    fig = draw_timeline(report)
    try:
        try:
            fig.savefig(path)
        except OSError as exc:
            raise SimulatorError(f"cannot write the plot to {path}: {exc.strerror}") from exc
    finally:
        plt.close(fig)
    return path
