"""fleetpki simulators: many real device agents in one process, scenarios, reports, the demo."""
