"""Operator tooling for factory lots: device ids, one-time tokens, birth certificates, bundles."""
