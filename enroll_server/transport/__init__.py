"""Listening: the TLS policy, the TLS socket transport, connection limits and the bind error."""
