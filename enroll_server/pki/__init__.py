"""Pure X.509: keys, CA hierarchy, certificate profiles, CSR policy, CRL and OCSP (no I/O)."""
