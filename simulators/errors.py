"""The simulator's error tree: one class per failure, each carrying the offending value."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of every error the simulator raises on purpose (the CLI prints it and exits 2)."""


class InvalidDeviceCount(SimulatorError):
    """--devices is not a usable number of simulated devices."""

    def __init__(self, value: object, limit: int) -> None:
        super().__init__(f"invalid device count {value!r}: give a whole number from 1 to {limit:,}")
        self.value = value
        self.limit = limit


class InvalidOption(SimulatorError):
    """A simulator option (ramp, interval, scenario parameter) with a value that cannot work."""

    def __init__(self, option: str, value: object, why: str) -> None:
        super().__init__(f"{option} {value!r}: {why}")
        self.option = option
        self.value = value
        self.why = why


class UnknownScenario(SimulatorError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown scenario {name!r}; choose one of: {', '.join(known)}")
        self.name = name
        self.known = known


class PortInUse(SimulatorError):
    """A port the self-hosted stack was told to listen on is taken."""

    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(
            f"cannot listen for {what} on {host}:{port}: the port is already in use "
            f"(another fleetpki serve?); choose another port, or 0 for any free port"
        )
        self.what = what
        self.host = host
        self.port = port


class ServerUnreachable(SimulatorError):
    """Nothing usable answers where the deployment under test should be."""

    def __init__(self, what: str, address: str, why: str) -> None:
        super().__init__(
            f"the {what} at {address} is unreachable ({why}); is `fleetpki serve` running "
            f"for this home? (run without --home to let the simulator start its own)"
        )
        self.what = what
        self.address = address
        self.why = why


class NeedsHostedStack(SimulatorError):
    """A scenario that must stop/restart the broker or server cannot run against another's."""

    def __init__(self, scenario: str, why: str) -> None:
        super().__init__(
            f"scenario {scenario!r} {why}, so it runs only against the simulator's own "
            f"stack: leave out --home"
        )
        self.scenario = scenario
        self.why = why


class NeedsLocalAgents(SimulatorError):
    """A scenario that reaches into the agents' objects cannot run them in fleet shards."""

    def __init__(self, scenario: str, why: str) -> None:
        super().__init__(
            f"scenario {scenario!r} {why}, so its agents run in the simulator's own process: "
            "leave out --shards (or use --shards 1)"
        )
        self.scenario = scenario
        self.why = why


class PlotUnavailable(SimulatorError):
    """--plot was asked for but matplotlib (the optional 'plot' extra) is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'fleetpki[plot]' (or: pip install matplotlib)"
        )
