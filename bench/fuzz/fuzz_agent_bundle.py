"""Fuzz what the agent reads from files: agent.toml, the bundle's ca.pem and token, and its
state folder (identity.json, the certificate chain and the key of the current generation).

A factory bundle is written by someone else's tooling, copied by hand, and a state folder
survives power cuts: each file may hold anything. By the first byte, one file of a valid
bundle is replaced by the input, then the agent's own loader for it runs (load_config,
Agent._check_anchor and _anchor, Agent._read_token, Keystore.load, Identity.chain,
Identity.load_key). Only the agent's errors (ConfigError, StateCorrupt, KeyUnreadable: all
AgentError, which name the file) may come out; anything else would stop the agent with a
traceback instead of a sentence.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from cryptography.hazmat.primitives.serialization import Encoding

    from device_agent.agent import Agent
    from device_agent.config import load_config
    from device_agent.errors import AgentError
    from device_agent.keystore import Keystore
    from tests.pki_helpers import make_ca

CA = make_ca()
CERT, KEY = CA.device_cert("dev-0001")
BUNDLE = Path(tempfile.mkdtemp(prefix="fleetpki-fuzz-bundle-"))
AGENT_TOML = b"""[device]
id = "dev-0001"
key_type = "ec-p256"

[enroll]
server = "https://localhost:8443"
token_file = "token"
trust_anchor = "ca.pem"
timeout = 30

[mqtt]
host = "localhost"
port = 8883
telemetry_interval = 30.0
keepalive = 30

[state]
dir = "state"
"""
CA_PEM = CA.root.cert.public_bytes(Encoding.PEM)
TOKEN = b"tok-0123456789abcdef\n"
(BUNDLE / "agent.toml").write_bytes(AGENT_TOML)
(BUNDLE / "ca.pem").write_bytes(CA_PEM)
(BUNDLE / "token").write_bytes(TOKEN)
CONFIG = load_config(BUNDLE / "agent.toml")
STORE = Keystore(CONFIG.state_dir)
IDENTITY = STORE.store(KEY, [CERT, CA.issuing.cert], datetime.now(UTC) + timedelta(days=1))
IDENTITY_JSON = STORE.identity_file.read_bytes()
CERT_PEM = IDENTITY.cert_path.read_bytes()
KEY_PEM = IDENTITY.key_path.read_bytes()
FILES = {
    0: (BUNDLE / "agent.toml", AGENT_TOML),
    1: (BUNDLE / "ca.pem", CA_PEM),
    2: (BUNDLE / "token", TOKEN),
    3: (STORE.identity_file, IDENTITY_JSON),
    4: (IDENTITY.cert_path, CERT_PEM),
    5: (IDENTITY.key_path, KEY_PEM),
}


def load(which: int) -> None:
    if which == 0:
        load_config(BUNDLE / "agent.toml")
        return
    agent = Agent(CONFIG, persist_status=False)
    if which == 1:
        agent._check_anchor()
        agent._anchors()
    elif which == 2:
        token = agent._read_token()
        assert token is None or (token and "\n" not in token)
    else:
        identity = STORE.load()
        if identity is not None:
            assert identity.chain
            identity.load_key()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    which = data[0] % len(FILES)
    path, good = FILES[which]
    path.write_bytes(data[1:])
    try:
        load(which)
    except AgentError:
        pass
    finally:
        path.write_bytes(good)


def seeds() -> list[bytes]:
    return [bytes([which]) + good for which, (_, good) in FILES.items()] + [
        b"\x03" + json.dumps({**json.loads(IDENTITY_JSON), "generation": 1.0}).encode()
    ]


if __name__ == "__main__":
    _harness.main("agent_bundle", test_one_input, seeds)
