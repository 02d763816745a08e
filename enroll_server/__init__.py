"""fleetpki enrollment service: CA, registry, EST, admin API and the embedded broker."""
