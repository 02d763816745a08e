"""EST (RFC 7030) wire format and routes."""
