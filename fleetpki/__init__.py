"""fleetpki: the shared contract of the device agent and the enrollment service (ids, topics)."""

__version__ = "0.1.0"
