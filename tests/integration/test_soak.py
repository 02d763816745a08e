"""The soak (simulators/soak.py, bench/soak.py) in two minutes: a small fleet in two shard
processes renewing every ~13 s, a tenth of it revoked every 30 s, the broker process
restarted twice.

The long form (bench/soak.py, BENCHMARKS.md "Faults") runs the same code for half an hour.
"""

from __future__ import annotations

import pytest

from simulators.soak import Sample, SoakOptions, SoakResult, run_soak, sample_processes

DEVICES = 10


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_two_minute_soak(tmp_path_factory: pytest.TempPathFactory) -> None:
    options = SoakOptions(
        devices=DEVICES,
        duration=100.0,
        validity=20.0,
        revoke_share=0.1,
        revoke_every=30.0,
        broker_every=45.0,
        sample_every=5.0,
        telemetry_interval=1.0,
        workdir=tmp_path_factory.mktemp("soak"),
        seed=18,
        shards=2,  # as the long form runs: the agents in two processes of their own
    )
    result = await run_soak(options)
    assert len(result.restarts) == 2 and len(result.revocations) == 3
    # Every agent never revoked renewed several times (validity 20 s: every ~13 s).
    assert result.min_renewals >= 3, result.min_renewals
    # QoS 1: every message the broker acknowledged while the observer was subscribed reached it.
    assert result.acknowledged >= DEVICES * 40, result.acknowledged
    assert result.lost == 0, f"{result.lost} of {result.acknowledged} acknowledged were lost"
    assert result.stuck == [], f"stuck agents: {result.stuck}"
    assert result.revoked_connected == []
    # The loop-lag heartbeat reports once per sample (the last sample is taken after it stops),
    # the worst of this process's loop and the shards'; ten agents leave the loops free: a
    # blocked loop would show here.
    assert len(result.loop_lag) == len(result.samples) - 1
    lags = sorted(lag for _, lag in result.loop_lag)
    assert lags[len(lags) // 2] < 0.5, lags
    # No descriptor leaks: ~70 renewals (a TLS connection to EST, a new MQTT session each).
    # The simulator's are its own process's and both shards' (three processes sampled).
    for process in ("server", "simulator", "broker"):
        warm, end = result.after_warmup("fds", process)
        assert 0 < end <= warm + 8, (process, warm, end)


def _result(series: list[tuple[float, int]], restarts: list[float]) -> SoakResult:
    result = SoakResult(SoakOptions(warmup=0.0), 1, series[-1][0])
    result.samples = [Sample(t, {"broker": v, "server": v}, {"broker": 1}, 1) for t, v in series]
    result.restarts = restarts
    return result


def test_slope_is_per_hour_and_per_broker_lifetime() -> None:
    leak = [(t * 60.0, 1000 + t * 10) for t in range(10)]  # 10 bytes a minute
    assert _result(leak, []).slope_per_hour("rss", "server") == pytest.approx(600)
    # A broker restarted at 5 min: its memory starts afresh; the slope is within lifetimes.
    sawtooth = [(t * 60.0, 1000 + (t % 5) * 10) for t in range(10)]
    restarted = _result(sawtooth, [300.0])
    assert restarted.slope_per_hour("rss", "broker") == pytest.approx(600)
    assert restarted.slope_per_hour("rss", "server") < 600  # across the restart: meaningless


def test_a_sample_sums_a_group_of_processes() -> None:
    """The simulator is this process plus its fleet shards: one line in the table, summed."""
    import os
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sample = sample_processes(
            1.0, {"simulator": [os.getpid(), child.pid], "gone": [2**22 + 7]}, 5
        )
        me, it = psutil.Process(), psutil.Process(child.pid)
        own, other = me.memory_info().rss, it.memory_info().rss
        assert abs(sample.rss["simulator"] - (own + other)) < 8 * 2**20
        assert sample.fds["simulator"] >= me.num_fds() - 2 + 3  # the child has stdin/out/err
        assert "gone" not in sample.rss and sample.connected == 5
    finally:
        child.kill()
        child.wait()
