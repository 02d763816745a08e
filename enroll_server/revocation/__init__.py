"""Revocation: the CRL publisher (no aiohttp: the mosquitto sync shares it), the CRL/OCSP routes."""
