"""The enroll/connect timeline as a PNG (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def plot_timeline(report: Report, path: Path) -> Path:
    """Draw enrolled, first-connected and (when known) connected-now counts over time."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    end = report.duration
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    try:
        ax.step(*_steps(report.timeline.enrolled, end), where="post", label="enrolled")
        ax.step(*_steps(report.timeline.connected, end), where="post", label="first connected")
        ax.step(*_connected_now(report, end), where="post", label="connected now", linewidth=1)
        for t, what in report.timeline.marks:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax.annotate(what, (t, 0), rotation=90, fontsize=7, va="bottom", ha="right")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("devices")
        ax.set_title(f"fleetpki simulate --scenario {report.scenario}: {report.devices:,} devices")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        try:
            fig.savefig(path)
        except OSError as exc:
            raise SimulatorError(f"cannot write the plot to {path}: {exc.strerror}") from exc
    finally:
        plt.close(fig)
    return path
