"""The keystore: 0600 keys, atomic generation swap, crash debris, corrupt and unreadable files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent.errors import KeyUnreadable, StateCorrupt
from device_agent.keys import KeyType, generate_key, private_key_pem
from device_agent.keystore import Keystore, write_atomic
from tests.pki_helpers import MemoryCa

NOW = datetime.now(UTC)


def _identity(ca: MemoryCa, kind: KeyType = KeyType.EC_P256):  # type: ignore[no-untyped-def]
    key = generate_key(kind)
    cert, _ = ca.device_cert("dev-1", key=key)  # type: ignore[arg-type]
    return key, [cert, ca.issuing.cert]


def test_empty_store_has_no_identity(tmp_path: Path) -> None:
    assert Keystore(tmp_path / "state").load() is None


@pytest.mark.parametrize("kind", list(KeyType))
def test_store_then_load_round_trip_with_modes(tmp_path: Path, ca: MemoryCa, kind: KeyType) -> None:
    store = Keystore(tmp_path / "state")
    key, chain = _identity(ca, kind)
    due = NOW + timedelta(days=20)
    stored = store.store(key, chain, due)
    loaded = store.load()
    assert loaded is not None
    assert loaded.generation == stored.generation == 1
    assert loaded.cert == chain[0] and list(loaded.chain) == chain
    assert loaded.next_renewal == due
    assert private_key_pem(loaded.load_key()) == private_key_pem(key)
    assert (loaded.key_path.stat().st_mode & 0o777) == 0o600
    assert (store.dir.stat().st_mode & 0o777) == 0o700
    assert (store.identity_file.stat().st_mode & 0o777) == 0o600
    record = json.loads(store.identity_file.read_text())
    assert record["serial"] == format(chain[0].serial_number, "x")


def test_swap_destroys_old_generation(tmp_path: Path, ca: MemoryCa) -> None:
    store = Keystore(tmp_path / "state")
    first = store.store(*_identity(ca), NOW)
    second = store.store(*_identity(ca), NOW)
    assert second.generation == 2
    assert not first.key_path.exists() and not first.key_path.parent.exists()
    loaded = store.load()
    assert loaded is not None and loaded.cert == second.cert


def test_store_refuses_mismatched_pair(tmp_path: Path, ca: MemoryCa) -> None:
    _key, chain = _identity(ca)
    with pytest.raises(ValueError, match="does not match"):
        Keystore(tmp_path).store(generate_key(KeyType.EC_P256), chain, NOW)


def test_crash_debris_is_ignored_then_swept(tmp_path: Path, ca: MemoryCa) -> None:
    store = Keystore(tmp_path / "state")
    good = store.store(*_identity(ca), NOW)
    # A crash after writing a new generation's key but before the commit rename.
    debris = store.dir / "gen-000002"
    debris.mkdir()
    (debris / "key.pem").write_bytes(b"half a ke")
    (store.dir / ".identity.json.123.tmp").write_text('{"generation": 2')
    loaded = store.load()
    assert loaded is not None and loaded.cert == good.cert
    store.sweep()
    assert not debris.exists()
    again = store.store(*_identity(ca), NOW)
    assert again.generation == 2


def test_unparsable_or_missing_key_is_named(tmp_path: Path, ca: MemoryCa) -> None:
    store = Keystore(tmp_path / "state")
    ident = store.store(*_identity(ca), NOW)
    ident.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyUnreadable) as info:
        store.load()
    assert info.value.path == ident.key_path
    ident.key_path.unlink()
    with pytest.raises(KeyUnreadable, match="cannot read"):
        store.load()


NOBODY = 65534


def _load_error_unprivileged(state: Path) -> tuple[str, str]:
    """(error class, message) of Keystore.load() in a process that file permissions apply to.

    Root reads 0000 files, and CI runs as root: there a forked child drops to `nobody` first.
    It enters the state folder while still root (the pytest temp tree above it is 0700) and
    loads it by a relative path, so only the state's own permissions apply.
    """
    if os.geteuid() != 0:
        try:
            Keystore(state).load()
        except KeyUnreadable as exc:
            return type(exc).__name__, str(exc)
        return "none", ""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.chdir(state)
            try:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
            except OSError as exc:
                result = f"cannot-drop|{exc}"
            else:
                try:
                    Keystore(Path(".")).load()
                    result = "none|"
                except Exception as exc:
                    result = f"{type(exc).__name__}|{exc}"
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()  # EOF when the child exits
    os.waitpid(pid, 0)
    kind, _, message = result.partition("|")
    if kind == "cannot-drop":  # e.g. a user namespace without `nobody`
        pytest.fail(f"cannot drop root privileges to test file permissions: {message}")
    return kind, message


def _dangling(key: Path) -> None:
    key.unlink()
    key.symlink_to(key.with_name("gone.pem"))


def _loop(key: Path) -> None:
    key.unlink()
    key.symlink_to(key)  # ELOOP, for root too


def _folder(key: Path) -> None:
    key.unlink()
    key.mkdir()  # EISDIR, for root too


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_folder, "Is a directory"),
        (_dangling, "No such file or directory"),
        (_loop, "Too many levels of symbolic links"),
    ],
    ids=["folder", "dangling-symlink", "symlink-loop"],
)
def test_key_file_that_cannot_be_read_is_named(
    tmp_path: Path,
    ca: MemoryCa,
    damage,
    why: str,  # type: ignore[no-untyped-def]
) -> None:
    """Read failures that hit root as hard as anyone (CI runs as root)."""
    store = Keystore(tmp_path / "state")
    ident = store.store(*_identity(ca), NOW)
    damage(ident.key_path)
    with pytest.raises(KeyUnreadable) as info:
        store.load()
    assert info.value.path == ident.key_path
    assert f"cannot read: {why}" in str(info.value) and str(ident.key_path) in str(info.value)


def test_permission_denied_key(tmp_path: Path, ca: MemoryCa) -> None:
    """A 0000 key file: real EACCES, also when the suite runs as root (see the helper)."""
    store = Keystore(tmp_path / "state")
    ident = store.store(*_identity(ca), NOW)
    if os.geteuid() == 0:
        # The state belongs to the agent's own user, as in the field (the systemd unit's
        # `fleetpki`); here `nobody`, the user the helper's child becomes.
        for path in (store.dir, *store.dir.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
    assert _load_error_unprivileged(store.dir) == ("none", "")  # readable: loads fine
    ident.key_path.chmod(0)
    kind, message = _load_error_unprivileged(store.dir)
    assert kind == "KeyUnreadable", message
    assert "cannot read: Permission denied" in message and "key.pem" in message


def test_corrupt_certificate_and_record_are_named(tmp_path: Path, ca: MemoryCa) -> None:
    store = Keystore(tmp_path / "state")
    ident = store.store(*_identity(ca), NOW)
    pem = ident.cert_path.read_bytes()
    ident.cert_path.write_bytes(pem[:100])
    with pytest.raises(StateCorrupt) as info:
        store.load()
    assert info.value.path == ident.cert_path
    # A valid certificate of another key is as bad as a corrupt one.
    other, _ = ca.device_cert("dev-1")
    from cryptography.hazmat.primitives.serialization import Encoding

    ident.cert_path.write_bytes(other.public_bytes(Encoding.PEM))
    with pytest.raises(StateCorrupt, match="does not match the key"):
        store.load()
    store.identity_file.write_text("{not json")
    with pytest.raises(StateCorrupt) as info2:
        store.load()
    assert info2.value.path == store.identity_file


def test_write_atomic_mode_is_never_wider(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        target = tmp_path / "k"
        write_atomic(target, b"secret", 0o600)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"secret"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


_WRITER = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from tests.pki_helpers import make_ca
from device_agent.keys import KeyType, generate_key
from device_agent.keystore import Keystore
ca = make_ca()
store = Keystore(Path(sys.argv[1]))
pairs = []
for _ in range(4):
    key = generate_key(KeyType.EC_P256)
    pairs.append((key, [ca.device_cert("dev-1", key=key)[0], ca.issuing.cert]))
print("ready", flush=True)
i = 0
while True:
    key, chain = pairs[i % 4]
    store.store(key, chain, datetime.now(UTC))
    i += 1
"""


def test_kill_9_during_writes_leaves_a_consistent_identity(tmp_path: Path) -> None:
    """SIGKILL a process that swaps identities in a tight loop, at varied moments: after each
    kill the store loads a key that matches its certificate (load() checks the pair)."""
    state = tmp_path / "state"
    repo = Path(__file__).resolve().parents[2]
    generations = set()
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(state)],
            cwd=repo,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        ident = Keystore(state).load()
        assert ident is not None
        generations.add(ident.generation)
        Keystore(state).sweep()
        assert sorted(p.name for p in state.iterdir()) == [
            f"gen-{ident.generation:06d}",
            "identity.json",
        ]
    assert len(generations) > 1  # the loop really was swapping when killed
