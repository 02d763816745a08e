"""The HTTP side: the aiohttp apps, admin API, device status, the state handlers reach."""
