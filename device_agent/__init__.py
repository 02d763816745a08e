"""fleetpki device agent: enroll over EST, keep an mTLS MQTT session, renew and rotate keys."""

__version__ = "0.1.0"
