"""Certificates in operation: PEM files reloaded in process, self-signed ones rotated.

Everything is real: certificates made with ``cryptography``, files in ``tmp_path``, TLS
handshakes over loopback, and (at the end) a running relay whose endpoint takes its QUIC
configuration from the store, the way the relay is wired.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import StartRelay, relay_url
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.certs import CertificateMode, CertificateStore, https_context
from relay.client import ClientError, RelayClient, connect, random_mac
from relay.config import RelayConfig
from relay.errors import CertificateError
from relay.packets import build
from relay.tls import MAX_PINNED_VALIDITY, TlsIdentity, generate_self_signed, write_identity

DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
T0 = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Ca:
    """A private CA issuing leaf certificates, as Let's Encrypt would (chain = leaf + CA)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        self.name = name
        now = utc_now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> TlsIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = utc_now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - HOUR)
            .not_valid_after(not_after or now + 6 * DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return TlsIdentity(cert, (self.certificate,), key, self_signed=False, source="test")

    def write(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path


def files_config(directory: Path) -> RelayConfig:
    return RelayConfig(
        cert_pem=directory / "cert.pem", key_pem=directory / "key.pem", data_dir=directory
    )


def key_pem(identity: TlsIdentity) -> bytes:
    return identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(identity: TlsIdentity) -> bytes:
    return b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (identity.certificate, *identity.chain)
    )


async def served_certificate(context: ssl.SSLContext, cafile: Path) -> tuple[str, str | None]:
    """Handshake with ``context`` over loopback TCP, verifying against ``cafile``: the SHA-256
    of the leaf the server sent, and the ALPN protocol chosen."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_context = ssl.create_default_context(cafile=str(cafile))
    client_context.set_alpn_protocols(["http/1.1"])

    async def server() -> None:
        stream = await listeners[0].accept()
        tls = trio.SSLStream(stream, context, server_side=True)
        await tls.do_handshake()
        await tls.send_all(b"ok")
        await tls.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            # Verified by name (localhost) against the CA; the address is only where we dial.
            client = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port),
                client_context,
                server_hostname="localhost",
            )
            await client.do_handshake()
            assert await client.receive_some() == b"ok"
            der = client.getpeercert(binary_form=True)
            alpn = client.selected_alpn_protocol()
            await client.aclose()
        await listeners[0].aclose()
    assert der is not None
    return hashlib.sha256(der).hexdigest(), alpn


# -- PEM files ---------------------------------------------------------------------------------


async def test_new_pair_is_served_to_new_handshakes_old_configuration_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Ca()
    cafile = ca.write(tmp_path / "ca.pem")
    first, second = ca.issue(), ca.issue()
    write_identity(first, tmp_path)
    store = CertificateStore(files_config(tmp_path))
    assert store.mode is CertificateMode.FILES
    assert store.current.hash_hex == first.hash_hex
    loaded = store.current
    assert store.published() == [loaded]
    old_quic = store.quic_configuration()
    assert store.quic_configuration() is old_quic  # cached, not rebuilt per handshake
    old_ssl = store.ssl_context()
    assert old_ssl is not None
    assert store.ssl_context() is old_ssl
    assert old_ssl.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert await served_certificate(old_ssl, cafile) == (first.hash_hex, "http/1.1")
    assert store.check() is False
    assert store.generation == 0

    write_identity(second, tmp_path)
    with caplog.at_level(logging.INFO, logger="relay.certs"):
        assert store.check() is True
    assert store.current.hash_hex == second.hash_hex
    assert store.generation == 1
    [line] = [r for r in caplog.records if r.name == "relay.certs"]
    assert line.levelno == logging.INFO
    assert second.hash_hex in line.getMessage()

    new_quic = store.quic_configuration()
    assert new_quic is not old_quic
    assert new_quic.certificate == second.certificate
    assert new_quic.certificate_chain == [ca.certificate]
    # Connections made before the reload keep the object they were given, unchanged.
    assert old_quic.certificate == first.certificate
    assert old_quic.private_key is loaded.private_key
    new_ssl = store.ssl_context()
    assert new_ssl is not None
    assert new_ssl is not old_ssl
    assert await served_certificate(new_ssl, cafile) == (second.hash_hex, "http/1.1")
    # Nothing changed since: no reload, nothing rebuilt.
    assert store.check() is False
    assert store.generation == 1
    assert store.quic_configuration() is new_quic


def expired(ca: Ca, good: TlsIdentity, directory: Path) -> None:
    now = utc_now()
    write_identity(ca.issue(now - 10 * DAY, now - DAY), directory)


def truncated(ca: Ca, good: TlsIdentity, directory: Path) -> None:
    pem = cert_pem(ca.issue())
    (directory / "cert.pem").write_bytes(pem[: len(pem) // 3])


def key_of_another_certificate(ca: Ca, good: TlsIdentity, directory: Path) -> None:
    (directory / "cert.pem").write_bytes(cert_pem(ca.issue()))
    (directory / "key.pem").write_bytes(key_pem(ca.issue()))


def missing_key(ca: Ca, good: TlsIdentity, directory: Path) -> None:
    (directory / "key.pem").unlink()


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (expired, "expired"),
        (truncated, "no PEM certificate"),
        (key_of_another_certificate, "does not match"),
        (missing_key, "not found"),
    ],
)
def test_broken_files_keep_the_old_identity_and_log_once(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    breakage: Callable[[Ca, TlsIdentity, Path], None],
    complaint: str,
) -> None:
    ca = Ca()
    old = ca.issue()
    write_identity(old, tmp_path)
    store = CertificateStore(files_config(tmp_path))
    quic = store.quic_configuration()
    breakage(ca, old, tmp_path)
    with caplog.at_level(logging.INFO, logger="relay.certs"):
        for _ in range(3):
            assert store.check() is False
    assert store.current.hash_hex == old.hash_hex
    assert store.generation == 0
    assert store.quic_configuration() is quic
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert complaint in warning.getMessage()
    assert "\n" not in warning.getMessage()

    caplog.clear()
    good = ca.issue()
    write_identity(good, tmp_path)
    with caplog.at_level(logging.INFO, logger="relay.certs"):
        assert store.check() is True
    assert store.current.hash_hex == good.hash_hex
    assert store.generation == 1
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_a_new_broken_file_is_logged_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Ca()
    old = ca.issue()
    write_identity(old, tmp_path)
    store = CertificateStore(files_config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="relay.certs"):
        truncated(ca, old, tmp_path)
        assert store.check() is False
        store.check()
        (tmp_path / "cert.pem").write_bytes(b"still not a certificate\n")
        assert store.check() is False
        store.check()
    assert len(caplog.records) == 2
    assert store.current.hash_hex == old.hash_hex


def test_certificate_first_key_a_poll_later_like_certbot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Ca()
    old, new = ca.issue(), ca.issue()
    write_identity(old, tmp_path)
    store = CertificateStore(files_config(tmp_path))
    (tmp_path / "cert.pem").write_bytes(cert_pem(new))
    with caplog.at_level(logging.WARNING, logger="relay.certs"):
        assert store.check() is False
    assert store.current.hash_hex == old.hash_hex
    assert "does not match" in caplog.records[0].getMessage()
    (tmp_path / "key.pem").write_bytes(key_pem(new))
    assert store.check() is True
    assert store.current.hash_hex == new.hash_hex
    assert store.generation == 1


def test_a_certificate_not_yet_valid_is_taken_once_it_is(tmp_path: Path) -> None:
    ca = Ca()
    old = ca.issue()
    write_identity(old, tmp_path)
    now = [utc_now()]
    store = CertificateStore(files_config(tmp_path), clock=lambda: now[0])
    new = ca.issue(now[0] + HOUR, now[0] + 5 * DAY)
    write_identity(new, tmp_path)
    assert store.check() is False
    assert store.current.hash_hex == old.hash_hex
    now[0] += 2 * HOUR  # the files did not change: time alone made them good
    assert store.check() is True
    assert store.current.hash_hex == new.hash_hex


def test_initial_identity_is_kept_when_the_files_hold_it(tmp_path: Path) -> None:
    ca = Ca()
    loaded = ca.issue()
    write_identity(loaded, tmp_path)
    store = CertificateStore(files_config(tmp_path), initial=loaded)
    assert store.current is loaded
    assert store.check() is False
    assert store.current is loaded
    assert store.generation == 0
    # An initial identity the files do not hold is replaced by what they hold.
    other = CertificateStore(files_config(tmp_path), initial=ca.issue())
    assert other.check() is True
    assert other.current.hash_hex == loaded.hash_hex


def test_unusable_files_at_startup_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not found"):
        CertificateStore(files_config(tmp_path))


def test_self_signed_pem_files_are_served_over_plain_http(tmp_path: Path) -> None:
    write_identity(generate_self_signed(), tmp_path)
    store = CertificateStore(files_config(tmp_path))
    assert store.current.self_signed
    assert store.ssl_context() is None


async def test_https_context_without_memfd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = Ca()
    identity = ca.issue()
    monkeypatch.delattr(os, "memfd_create", raising=False)
    context = https_context(identity)
    assert await served_certificate(context, ca.write(tmp_path / "ca.pem")) == (
        identity.hash_hex,
        "http/1.1",
    )


# -- self-signed rotation ----------------------------------------------------------------------


def assert_pinnable(identity: TlsIdentity, now: datetime.datetime, sans: tuple[str, ...]) -> None:
    assert identity.self_signed
    assert identity.pinning_problems() == []
    assert identity.not_after - identity.not_before <= MAX_PINNED_VALIDITY
    assert identity.not_before <= now < identity.not_after
    names = identity.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(sans) <= {str(v) for v in names.value.get_values_for_type(x509.DNSName)}


def test_self_signed_rotation_publishes_next_then_promotes_it() -> None:
    sans = ("relay.test",)
    config = RelayConfig(cert_sans=sans, self_signed_days=13)
    now = [T0]
    store = CertificateStore(config, clock=lambda: now[0])
    assert store.mode is CertificateMode.SELF_SIGNED
    assert store.ssl_context() is None
    first = store.current
    assert_pinnable(first, T0, sans)
    assert first.not_after - first.not_before == 13 * DAY
    assert store.published() == [first]
    assert store.next is None
    assert store.check() is False

    lifetime = first.not_after - first.not_before
    now[0] = first.not_before + lifetime / 2 - datetime.timedelta(minutes=1)
    assert store.check() is False
    assert store.next is None
    now[0] += datetime.timedelta(minutes=2)
    assert store.check() is True
    assert store.generation == 1
    following = store.next
    assert following is not None
    assert store.current is first
    assert store.published() == [first, following]
    assert following.hash_hex != first.hash_hex
    for identity in store.published():
        assert_pinnable(identity, now[0], sans)
    assert store.check() is False

    now[0] = first.not_after - lifetime / 4 + datetime.timedelta(minutes=1)
    assert store.check() is True
    assert store.generation == 2
    assert store.current.hash_hex == following.hash_hex
    assert store.next is None
    assert store.published() == [following]
    assert_pinnable(store.current, now[0], sans)
    quic = store.quic_configuration()
    assert quic.certificate == following.certificate


@pytest.mark.parametrize("days", [13.0, 14.0, 0.5])
def test_rotation_over_weeks_never_strands_a_client(days: float) -> None:
    """Poll hourly for eight lifetimes: every published certificate is pinnable and valid, and
    a hash list fetched at any poll keeps naming the served certificate for at least a quarter
    of the lifetime (less one poll)."""
    config = RelayConfig(self_signed_days=days)
    lifetime = datetime.timedelta(days=days)
    step = min(HOUR, lifetime / 50)
    now = [T0]
    store = CertificateStore(config, clock=lambda: now[0])
    history: list[tuple[datetime.datetime, set[str], str]] = []
    generation = store.generation
    while now[0] < T0 + 8 * lifetime:
        changed = store.check()
        assert changed == (store.generation != generation)
        generation = store.generation
        for identity in store.published():
            assert_pinnable(identity, now[0], ())
            assert identity.not_after - identity.not_before == lifetime
        history.append((now[0], {i.hash_hex for i in store.published()}, store.current.hash_hex))
        now[0] += step
    rotations = len({served for _, _, served in history})
    assert rotations >= 8  # it did rotate, about twice per lifetime
    for i, (fetched_at, fetched, _) in enumerate(history):
        stranded = next((t for t, _, served in history[i:] if served not in fetched), None)
        if stranded is not None:
            assert stranded - fetched_at >= lifetime / 4 - step


def test_fourteen_days_is_the_limit() -> None:
    store = CertificateStore(RelayConfig(self_signed_days=14), clock=lambda: T0)
    assert store.current.not_after - store.current.not_before == MAX_PINNED_VALIDITY
    assert store.current.pinning_problems() == []
    for days in (14.001, 15, 0, -1):
        with pytest.raises(CertificateError, match="14"):
            CertificateStore(RelayConfig(self_signed_days=days))


def test_short_lifetime_still_covers_now() -> None:
    # generate_self_signed backdates by an hour; a 15-minute certificate must not start out
    # expired.
    store = CertificateStore(RelayConfig(self_signed_days=0.01), clock=lambda: T0)
    assert_pinnable(store.current, T0, ())


def test_clock_jump_replaces_an_invalid_certificate() -> None:
    now = [T0]
    store = CertificateStore(RelayConfig(), clock=lambda: now[0])
    now[0] += 7 * DAY
    assert store.check() is True  # next published
    now[0] += 60 * DAY  # a suspended laptop wakes up: both expired
    assert store.check() is True
    assert store.next is None
    assert_pinnable(store.current, now[0], ())
    now[0] -= 90 * DAY  # and the clock goes back before both
    assert store.check() is True
    assert_pinnable(store.current, now[0], ())


def test_initial_self_signed_identity_is_used() -> None:
    initial = generate_self_signed(days=13, now=T0)
    store = CertificateStore(RelayConfig(), clock=lambda: T0, initial=initial)
    assert store.current is initial
    assert store.check() is False


# -- the polling task --------------------------------------------------------------------------


async def test_run_picks_up_a_change_and_survives_a_failing_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Ca()
    write_identity(ca.issue(), tmp_path)
    store = CertificateStore(files_config(tmp_path))
    real_check = store.check
    calls = 0
    reloaded = trio.Event()

    def flaky_check() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        changed = real_check()
        if changed:
            reloaded.set()
        return changed

    store.check = flaky_check  # type: ignore[method-assign]
    new = ca.issue()
    with caplog.at_level(logging.ERROR, logger="relay.certs"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run, 0.01)
            write_identity(new, tmp_path)
            with trio.fail_after(5):
                await reloaded.wait()
            nursery.cancel_scope.cancel()
    assert store.current.hash_hex == new.hash_hex
    assert store.generation == 1
    assert calls >= 2
    assert "boom" in caplog.text


# -- end to end: a running relay ---------------------------------------------------------------


def udp_frame(src: RelayClient, dst: RelayClient, fill: int) -> bytes:
    """A unicast frame (port security wants the sender's own MAC and address)."""
    assert src.mac is not None and src.assigned is not None
    assert dst.mac is not None and dst.assigned is not None
    body = bytes((fill + i) & 0xFF for i in range(40))
    return build.udp_frame(
        dst.mac, src.mac, src.assigned.ip.packed, dst.assigned.ip.packed, 9, 9, body
    )


async def exchange(a: RelayClient, b: RelayClient, fill: int) -> None:
    """A frame from ``a`` reaches ``b`` and one from ``b`` reaches ``a``."""
    for src, dst in ((a, b), (b, a)):
        sent = udp_frame(src, dst, fill)
        src.send_frame(sent)
        with trio.fail_after(5):
            assert await dst.receive_frame() == sent


async def test_reload_under_a_running_relay_keeps_sessions_up(
    nursery: trio.Nursery, start_relay: StartRelay, tmp_path: Path
) -> None:
    pem_dir = tmp_path / "pem"
    write_identity(generate_self_signed(), pem_dir)
    relay = await start_relay(
        cert_pem=pem_dir / "cert.pem", key_pem=pem_dir / "key.pem", cert_poll_interval=0.05
    )
    store = relay.relay.certs  # polled by the relay itself every 50 ms
    url, old_hash = relay_url(relay), relay.identity.hash_hex

    a = await connect(nursery, url, cert_hash=old_hash)
    b = await connect(nursery, url, cert_hash=old_hash)
    with trio.fail_after(5):
        await a.register(random_mac())
        await b.register(random_mac())
    await exchange(a, b, 1)

    new = generate_self_signed()
    write_identity(new, pem_dir)
    with trio.fail_after(5):
        await store.wait_changed()  # the relay's own poll picks the new files up
    assert store.current.hash_hex == new.hash_hex
    with pytest.raises(ClientError, match="pinned hash"):
        await connect(nursery, url, cert_hash=old_hash, handshake_timeout=5)
    c = await connect(nursery, url, cert_hash=new.hash_hex)
    with trio.fail_after(5):
        await c.register(random_mac())
    await exchange(a, b, 2)  # the sessions opened before the reload live on
    await exchange(a, c, 3)  # and talk to the ones opened after it

    generation = store.generation
    (pem_dir / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntrunc")
    assert store.check() is False
    assert store.generation == generation
    d = await connect(nursery, url, cert_hash=new.hash_hex)
    with trio.fail_after(5):
        await d.register(random_mac())
    await exchange(c, d, 4)
    await exchange(a, b, 5)
    for client in (a, b, c, d):
        await client.aclose()
