"""A CA change reaches the other nodes when the issuing key is in a PKCS#11 token (SoftHSM2):
`fleetpki ca rollover --ca-key URI` at node A records the new key's URI, never a key; node B,
on the same token, adopts it through H/ca/issuing.next (home/ca_state.py): its fleetpki.toml
then names the new object and its home loads with the token's new key.

Every PKCS#11 call runs in a subprocess with this module's own SOFTHSM2_CONF (tests/softhsm.py).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from cryptography import x509

from enroll_server.pki.key_id import key_id
from tests.integration.test_hsm_issuing_rollover import NEW_URI, OLD_URI, _init
from tests.integration.test_hsm_root import _python, _run, env  # noqa: F401
from tests.pg_cluster import PASSWORD

# What serve does at its next look (wiring/issuers.py): adopt, then load the home.
_FOLLOW = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from enroll_server.home.ca_state import follow
from enroll_server.home.layout import HomeLayout, load_home, registry_location
from enroll_server.registry import Registry
layout = HomeLayout(Path(sys.argv[1]))
with Registry.open(registry_location(layout)) as registry:
    print(follow(layout, registry, datetime.now(UTC)))
print(load_home(layout.root).issuer.key.uri)
"""


def test_a_rollover_into_a_new_token_key_reaches_node_b(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    pg_url: str,
) -> None:
    password = tmp_path / "pg.password"
    password.write_text(PASSWORD + "\n")
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    args = ("--ca-key", OLD_URI, "--registry", bare, "--registry-password-file", str(password))
    home_a, ca_a, good = _init(env, tmp_path, *args)
    home_b = tmp_path / "b"
    added = _run(good, "node", "add", "--home", str(home_a), "--out", str(home_b),
                 "--hostname", "127.0.0.1")  # fmt: skip
    assert added.returncode == 0, added.stderr
    old_id = key_id(x509.load_pem_x509_certificate((ca_a / "issuing.pem").read_bytes()))
    rolled = _run(good, "ca", "rollover", "--home", str(home_a), "--ca-key", NEW_URI)
    assert rolled.returncode == 0, rolled.stderr
    adopted = _python(good, _FOLLOW, str(home_b))
    assert adopted.returncode == 0, adopted.stderr
    assert adopted.stdout.split() == ["1", NEW_URI + ";type=private"]
    ca_b = home_b / "ca"
    assert (ca_b / "issuing.pem").read_bytes() == (ca_a / "issuing.pem").read_bytes()
    assert tomllib.loads((home_b / "fleetpki.toml").read_text())["ca"]["key"] == (
        NEW_URI + ";type=private"
    )
    assert not (ca_b / "issuing.next").exists() and not (ca_b / "issuing.key").exists()
    assert (ca_b / "issuers" / f"{old_id}.uri").read_text() == (
        ca_a / "issuers" / f"{old_id}.uri"
    ).read_text()
