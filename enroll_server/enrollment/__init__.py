"""The enrollment core: authorize, check, issue, record; tokens, throttle, operators. No HTTP."""
