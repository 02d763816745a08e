"""The TLS server certificate: renewal in the home, and reloading it into live SSL contexts."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from enroll_server.home.config import render_config
from enroll_server.home.layout import (
    SERVER_CERT_DAYS,
    HomeLayout,
    LoadedHome,
    load_home,
    renew_server_certificate,
)
from enroll_server.home.server_certificate import (
    ServerCertificateError,
    ServerCertificates,
    read_pair,
    renewal_due_at,
)
from enroll_server.pki.ca import check_hostname
from enroll_server.web.app import server_ssl_context
from enroll_server.wiring.server import renew_and_record
from tests.live_server import make_home


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedHome:
    make_home(tmp_path / "h", hostnames=("localhost", "127.0.0.1", "::1", "gw.lan"))
    return load_home(tmp_path / "h")


def served_serial(ctx: ssl.SSLContext, root: Path, verify: bool = True) -> int:
    """The serial of the certificate a server context presents, by a real (in-memory) handshake.

    `verify=False` for certificates issued at a pretended time (not yet valid really)."""
    client_ctx = ssl.create_default_context(cafile=str(root))
    if not verify:
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
    der = client.getpeercert(binary_form=True)
    assert der is not None, "no handshake"
    return x509.load_der_x509_certificate(der).serial_number


def context(layout: HomeLayout) -> ssl.SSLContext:
    return server_ssl_context(layout.server_cert, layout.server_key, layout.chain)


def serial_on_disk(layout: HomeLayout) -> int:
    return read_pair(layout.server_cert, layout.server_key)[2].serial_number


def test_renewal_writes_a_new_key_and_certificate(loaded: LoadedHome) -> None:
    layout = loaded.layout
    old_key = layout.server_key.read_bytes()
    now = datetime.now(UTC)
    cert = renew_server_certificate(layout, loaded.issuer, loaded.config, now)
    assert layout.server_key.read_bytes() != old_key
    assert stat.S_IMODE(os.stat(layout.server_key).st_mode) == 0o600
    chain_pem, _, leaf = read_pair(layout.server_cert, layout.server_key)
    assert leaf == cert
    chain = x509.load_pem_x509_certificates(chain_pem)
    assert chain == [cert, loaded.issuer.cert]  # what a TLS server sends
    cert.verify_directly_issued_by(loaded.issuer.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gw.lan"]
    assert cert.not_valid_after_utc - now.replace(microsecond=0) == timedelta(days=SERVER_CERT_DAYS)


def test_renewal_is_due_at_two_thirds_of_the_lifetime(loaded: LoadedHome) -> None:
    cert = read_pair(loaded.layout.server_cert, loaded.layout.server_key)[2]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert renewal_due_at(cert) == cert.not_valid_before_utc + lifetime * 2 / 3


def test_read_pair_refuses_a_key_of_another_certificate(loaded: LoadedHome, tmp_path: Path) -> None:
    layout = loaded.layout
    other = tmp_path / "other.key"
    other.write_bytes(layout.server_key.read_bytes())
    renew_server_certificate(layout, loaded.issuer, loaded.config, datetime.now(UTC))
    with pytest.raises(ServerCertificateError, match=r"other\.key is not the key of"):
        read_pair(layout.server_cert, other)
    with pytest.raises(ServerCertificateError, match="cannot read"):
        read_pair(layout.server_cert, tmp_path / "missing.key")


def test_a_changed_pair_is_loaded_into_the_live_contexts(loaded: LoadedHome) -> None:
    layout = loaded.layout
    contexts = [context(layout), context(layout)]
    keeper = ServerCertificates(layout.server_cert, layout.server_key, contexts, datetime.now)
    before = serial_on_disk(layout)
    assert keeper.reload_if_changed() is False  # nothing changed yet
    renew_server_certificate(layout, loaded.issuer, loaded.config, datetime.now(UTC))
    assert keeper.reload_if_changed() is True
    after = serial_on_disk(layout)
    assert after != before and keeper.current.serial_number == after
    for ctx in contexts:
        assert served_serial(ctx, layout.root_cert) == after
    assert keeper.reloads == 1 and keeper.failures == 0
    # The private copies it loaded from are gone; only the real pair stays in tls/.
    assert sorted(p.name for p in layout.tls_dir.iterdir()) == ["server.key", "server.pem"]
    assert "fleetpki_server_certificate_reloads_total 1" in keeper.metrics_text()


def test_a_half_replaced_pair_leaves_the_contexts_serving(
    loaded: LoadedHome, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL would drop the context's certificate on a mismatched key: never loaded."""
    layout = loaded.layout
    ctx = context(layout)
    keeper = ServerCertificates(layout.server_cert, layout.server_key, [ctx], datetime.now)
    old_serial, old_cert = serial_on_disk(layout), layout.server_cert.read_bytes()
    renew_server_certificate(layout, loaded.issuer, loaded.config, datetime.now(UTC))
    new_cert = layout.server_cert.read_bytes()
    layout.server_cert.write_bytes(old_cert)  # the new key beside the old certificate
    assert keeper.reload_if_changed() is False
    assert "not reloaded, the current one stays" in caplog.text
    assert served_serial(ctx, layout.root_cert) == old_serial
    assert keeper.failures == 1
    layout.server_cert.write_bytes(new_cert)  # the renewal completes
    assert keeper.reload_if_changed() is True
    assert served_serial(ctx, layout.root_cert) == serial_on_disk(layout) != old_serial


async def test_check_renews_once_due_and_not_before(loaded: LoadedHome) -> None:
    layout = loaded.layout
    ctx = context(layout)
    cert = read_pair(layout.server_cert, layout.server_key)[2]
    due = renewal_due_at(cert)
    clock = [due - timedelta(seconds=1)]
    calls: list[datetime] = []

    def renew(now: datetime) -> None:
        calls.append(now)
        renew_server_certificate(layout, loaded.issuer, loaded.config, now)

    keeper = ServerCertificates(
        layout.server_cert, layout.server_key, [ctx], lambda: clock[0], renew=renew
    )
    await keeper.check()
    assert calls == [] and served_serial(ctx, layout.root_cert) == cert.serial_number
    clock[0] = due
    await keeper.check()
    assert calls == [due]
    assert keeper.renewals == 1 and keeper.current.serial_number != cert.serial_number
    assert served_serial(ctx, layout.root_cert, verify=False) == keeper.current.serial_number
    await keeper.check()  # the new certificate is not due: no second renewal
    assert len(calls) == 1


async def test_a_failed_renewal_is_counted_and_retried(
    loaded: LoadedHome, caplog: pytest.LogCaptureFixture
) -> None:
    layout = loaded.layout
    attempts: list[datetime] = []

    def broken(now: datetime) -> None:
        attempts.append(now)
        raise OSError(28, "No space left on device")

    far = datetime.now(UTC) + timedelta(days=1000)  # expired: due at once
    keeper = ServerCertificates(
        layout.server_cert,
        layout.server_key,
        [context(layout)],
        lambda: far,
        renew=broken,
        interval=0.01,
        retry_after=0,
    )
    keeper.start()
    try:
        for _ in range(200):
            if len(attempts) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await keeper.stop()
    assert len(attempts) >= 2  # the task survived the first failure
    assert keeper.failures >= 2 and keeper.renewals == 0
    assert "renewal failed" in caplog.text


def test_host_names_are_checked() -> None:
    for good in ("gw.lan", "localhost", "10.0.0.5", "::1", "a-b.example.com.", "x" * 63):
        assert check_hostname(good) == good
    for bad in ("bad host", "-x.lan", "a..b", "x" * 64, "", "gw_1.lan", "é.lan"):
        with pytest.raises(ValueError, match="neither an IP address nor a DNS host name"):
            check_hostname(bad)


def test_hostnames_of_the_config_go_into_the_certificate(loaded: LoadedHome) -> None:
    config = replace(loaded.config, hostnames=(*loaded.config.hostnames, "10.1.2.3"))
    cert = renew_server_certificate(loaded.layout, loaded.issuer, config, datetime.now(UTC))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
    ]


def test_the_server_renews_for_the_host_names_in_the_config_file_now(
    loaded: LoadedHome,
) -> None:
    """A name added to fleetpki.toml after `serve` started is kept by its next renewal."""
    later = replace(loaded.config, hostnames=(*loaded.config.hostnames, "added.lan"))
    loaded.layout.config.write_text(render_config(later))
    cert = renew_and_record(loaded, datetime.now(UTC), actor="server")  # loaded: the old config
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "added.lan" in san.get_values_for_type(x509.DNSName)


def test_a_pair_renewed_before_the_keeper_starts_is_loaded_at_once(loaded: LoadedHome) -> None:
    """The contexts are built from the files a moment before the keeper: a renewal in between
    must not be taken for what they already hold."""
    layout = loaded.layout
    ctx = context(layout)
    new = renew_server_certificate(layout, loaded.issuer, loaded.config, datetime.now(UTC))
    keeper = ServerCertificates(layout.server_cert, layout.server_key, [ctx], datetime.now)
    assert served_serial(ctx, layout.root_cert) == new.serial_number
    assert keeper.reload_if_changed() is False and keeper.reloads == 0


async def test_a_renewal_that_does_not_take_is_not_repeated_every_check(
    loaded: LoadedHome,
) -> None:
    """Renewed, but the pair never loads (here: nothing written): no certificate a minute."""
    layout = loaded.layout
    calls: list[datetime] = []
    far = datetime.now(UTC) + timedelta(days=1000)
    keeper = ServerCertificates(
        layout.server_cert,
        layout.server_key,
        [context(layout)],
        lambda: far,
        renew=calls.append,
        retry_after=3600,
    )
    for _ in range(20):
        await keeper.check()
    assert len(calls) == 1
    keeper.retry_after = 0  # the retry is due: tried again
    keeper._next_attempt = 0.0
    await keeper.check()
    assert len(calls) == 2
