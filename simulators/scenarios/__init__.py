"""The simulator's scenarios by name (`fleetpki simulate --scenario NAME`)."""

from __future__ import annotations

from simulators.errors import UnknownScenario
from simulators.scenarios.bad_csr import BadCsr
from simulators.scenarios.base import Scenario
from simulators.scenarios.broker_restart import BrokerRestart
from simulators.scenarios.clock_skew import ClockSkew
from simulators.scenarios.expired_cert import ExpiredCert
from simulators.scenarios.happy import Happy
from simulators.scenarios.renewal_storm import RenewalStorm
from simulators.scenarios.revoke import Revoke
from simulators.scenarios.server_outage import ServerOutage
from simulators.scenarios.token_replay import TokenReplay

SCENARIOS: dict[str, type[Scenario]] = {
    s.name: s
    for s in (
        Happy,
        RenewalStorm,
        Revoke,
        TokenReplay,
        BadCsr,
        ExpiredCert,
        ClockSkew,
        BrokerRestart,
        ServerOutage,
    )
}


def scenario_names() -> list[str]:
    return list(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise UnknownScenario(name, scenario_names()) from None


__all__ = ["SCENARIOS", "Scenario", "get_scenario", "scenario_names"]
