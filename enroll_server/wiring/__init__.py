"""Wiring the server: open home and registry, start the sites and broker, run until a signal."""
