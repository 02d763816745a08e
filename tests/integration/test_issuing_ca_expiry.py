"""`fleetpki serve` warns (log, metric) from [ca] expiry_warning before the issuing CA expires."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from enroll_server.home.config import ConfigError, load_config
from enroll_server.home.layout import load_home
from enroll_server.pki.ca_expiry import expiry_warning
from tests.live_server import make_home, start_live_server


def _metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, text
    return float(lines[0].split()[1])


@pytest.mark.parametrize(("warn_days", "warned"), [(180, False), (4000, True)])
def test_serve_warns_only_within_the_configured_time_before_issuing_ca_expiry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, warn_days: int, warned: bool
) -> None:
    # init makes an issuing CA of 1825 days: 180 days of warning is far off, 4000 is now.
    home = tmp_path / "home"
    make_home(home, ca_expiry_warning=timedelta(days=warn_days))
    assert load_home(home).config.ca_expiry_warning == timedelta(days=warn_days)
    caplog.set_level(logging.WARNING)
    server = start_live_server(home)
    try:
        metrics = server.metrics()
    finally:
        server.stop()
    not_after = load_home(home).issuer.cert.not_valid_after_utc
    assert _metric(metrics, "fleetpki_issuing_ca_not_after_seconds") == round(not_after.timestamp())
    assert _metric(metrics, "fleetpki_issuing_ca_expiry_warning") == (1 if warned else 0)
    logged = [r.getMessage() for r in caplog.records if "issuing CA" in r.getMessage()]
    if warned:
        assert len(logged) == 1 and not_after.isoformat() in logged[0], logged
    else:
        assert logged == []


def test_expiry_warning_boundaries_and_an_expired_ca(tmp_path: Path) -> None:
    cert = load_home(make_home(tmp_path / "home").root).issuer.cert
    not_after = cert.not_valid_after_utc
    week = timedelta(days=7)
    assert expiry_warning(cert, not_after - week - timedelta(seconds=1), week) is None
    message = expiry_warning(cert, not_after - week, week)
    assert message is not None and "expires at" in message
    expired = expiry_warning(cert, not_after + timedelta(seconds=1), week)
    assert expired is not None and "expired at" in expired


def test_a_bad_expiry_warning_names_the_key(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home").root
    config = home / "fleetpki.toml"
    config.write_text(config.read_text().replace('expiry_warning = "180d"', 'expiry_warning = "x"'))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.key == "ca.expiry_warning"
