"""The agent makes a renewal's key in threads of its own, not in the event loop's default
executor: aiomqtt runs every MQTT connect there (paho's blocking TCP connect and TLS
handshake), and a simulator's thousands of reconnects after a broker restart held renewals
past their window in the 2,000-agent soak (BENCHMARKS.md, "Soak")."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.agent import Agent
from device_agent.config import parse_config

AGENT_TOML = """\
[device]
id = "dev-000001"
key_type = "ec-p256"
[enroll]
server = "https://localhost:8443"
token_file = "token"
trust_anchor = "ca.pem"
[mqtt]
host = "localhost"
port = 8883
[state]
dir = "state"
"""


def test_a_renewal_key_does_not_queue_behind_the_default_executor(tmp_path: Path) -> None:
    agent = Agent(parse_config(AGENT_TOML, tmp_path / "agent.toml"))
    release = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        busy = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(busy)
        # The default executor's only thread is held, as by a connect to a broker that is
        # restarting; more connects wait behind it.
        held = [loop.run_in_executor(None, release.wait, 30) for _ in range(3)]
        try:
            key = await asyncio.wait_for(agent._new_key(), 5.0)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert not any(f.done() for f in held)  # the executor was busy all along
        finally:
            release.set()
            await asyncio.gather(*held)

    asyncio.run(main())
