"""The operator's home folder: its layout, fleetpki.toml, the TLS server certificate."""
