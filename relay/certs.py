"""The certificate new handshakes use, kept fresh while the relay runs.

Two modes, chosen by the configuration:

* **files** (``--cert-pem``/``--key-pem``): the PEM files are polled and reloaded in process
  when they change, so certbot or a secret mount can renew them without a restart. A broken
  pair (half written, key of another certificate, expired) is refused with one log line and the
  old identity stays in service; certbot writes the certificate before the key, so the next poll
  simply tries again.
* **self-signed**: the relay makes its own pinnable certificates and rotates them before expiry.
  When *current* has used half its validity a *next* one is made and published with it; when
  *current* has less than a quarter left, *next* takes over. A client that fetched the hash list
  (``published()``) keeps connecting across a rotation.

Existing connections are untouched by either: the endpoint asks :meth:`quic_configuration` for
each new connection, and a connection keeps the configuration object it started with.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

from relay.config import RelayConfig
from relay.errors import CertificateError
from relay.tls import BACKDATE, MAX_PINNED_VALIDITY, TlsIdentity, load_identity, self_signed

log = logging.getLogger("relay.certs")

Clock = Callable[[], datetime.datetime]
FileStat = tuple[int, int, int, int] | None
"""(mtime_ns, ctime_ns, size, inode) of one file, or None when it cannot be stat'ed."""
RACY_NS = 2_000_000_000
"""Timestamps younger than this may not tell two writes apart (coarse kernel clock)."""


class CertificateMode(enum.Enum):
    FILES = "files"
    SELF_SIGNED = "self-signed"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _stat(path: Path) -> FileStat:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def _racy(stats: tuple[FileStat, ...], now_ns: int) -> bool:
    return any(st is None or now_ns - max(st[0], st[1]) < RACY_NS for st in stats)


def _content_digest(paths: tuple[Path, ...]) -> bytes:
    """One hash over every file's bytes (an unreadable file counts as its own state)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            digest.update(f"!{exc.errno}".encode())
            continue
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


def _same_identity(a: TlsIdentity, b: TlsIdentity) -> bool:
    return a.certificate == b.certificate and a.chain == b.chain


def _describe(identity: TlsIdentity) -> str:
    return (
        f"SHA-256 {identity.hash_hex}, valid {identity.not_before:%Y-%m-%d %H:%M} to "
        f"{identity.not_after:%Y-%m-%d %H:%M} UTC"
    )


def identity_pem(identity: TlsIdentity) -> bytes:
    """Leaf, chain and key in one PEM blob, as ``SSLContext.load_cert_chain`` reads it."""
    certs = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (identity.certificate, *identity.chain)
    )
    key = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certs + key


def _load_cert_chain(context: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` only reads paths: hand it an anonymous memory file where Linux has
    one (the key never touches a disk), else a private temporary directory."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd: int = memfd_create("relay-identity", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as file:
                file.write(pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="relay-tls-") as directory:
        path = Path(directory) / "identity.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        context.load_cert_chain(path)


def https_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+, ALPN http/1.1) serving ``identity``'s chain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load_cert_chain(context, identity_pem(identity))
    return context


def check_self_signed_days(days: float) -> datetime.timedelta:
    """The self-signed lifetime; more than 14 days would make browsers refuse the hash."""
    lifetime = datetime.timedelta(days=days)
    if not datetime.timedelta(0) < lifetime <= MAX_PINNED_VALIDITY:
        raise CertificateError(f"self-signed validity must be within (0, 14] days, not {days:g}")
    return lifetime


class CertificateStore:
    """The identity new handshakes use: PEM files reloaded when they change, or self-signed
    certificates rotated before expiry (current + next published).

    ``clock`` returns an aware UTC datetime (tests pass a fake one to drive rotation).
    Without ``initial``, files mode loads the files (a bad one raises CertificateError) and
    self-signed mode makes a certificate; ``self_signed_days`` outside (0, 14] raises too.
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        clock: Clock = utc_now,
        initial: TlsIdentity | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.generation = 0
        self._change_event = trio.Event()
        self.next: TlsIdentity | None = None
        self._quic: tuple[TlsIdentity, QuicConfiguration] | None = None
        self._ssl: tuple[TlsIdentity, ssl.SSLContext | None] | None = None
        # files mode: what the files looked like last time, and the failure already logged.
        self._paths: tuple[Path, ...] = ()
        self._stats: tuple[FileStat, ...] | None = None
        self._digest: bytes | None = None
        self._failure: str | None = None
        self._lifetime = MAX_PINNED_VALIDITY  # of generated certificates (self-signed mode)
        if config.cert_pem is not None and config.key_pem is not None:
            self.mode = CertificateMode.FILES
            self._paths = (config.cert_pem, config.key_pem)
            if initial is None:
                # Startup: a bad file is fatal (CertificateError), unlike a bad reload.
                self._remember(self._stat_files())
                self._digest = _content_digest(self._paths)
                initial = load_identity(config.cert_pem, config.key_pem, now=clock())
            # With ``initial`` the first check() reads the files and keeps ``initial`` if
            # they hold the same certificate.
            self.current: TlsIdentity = initial
        else:
            self.mode = CertificateMode.SELF_SIGNED
            self._lifetime = check_self_signed_days(config.self_signed_days)
            self.current = initial or self._generate(clock())

    # -- what the rest of the relay reads ------------------------------------------------------

    def published(self) -> list[TlsIdentity]:
        """The certificates a client should pin: current, then next once it exists."""
        return [self.current] if self.next is None else [self.current, self.next]

    def quic_configuration(self) -> QuicConfiguration:
        """The configuration for a new QUIC connection (one object per certificate)."""
        cached = self._quic
        if cached is None or cached[0] is not self.current:
            # Imported late: relay.server builds the store, so a top-level import would cycle.
            from relay.server import quic_configuration

            cached = (self.current, quic_configuration(self.config, self.current))
            self._quic = cached
        return cached[1]

    def ssl_context(self) -> ssl.SSLContext | None:
        """HTTPS context for a CA-issued certificate; None for a self-signed one, which a
        browser would not trust over TCP anyway (plain HTTP is served instead)."""
        cached = self._ssl
        if cached is None or cached[0] is not self.current:
            context = None if self.current.self_signed else https_context(self.current)
            cached = (self.current, context)
            self._ssl = cached
        return cached[1]

    # -- keeping it fresh ----------------------------------------------------------------------

    def check(self) -> bool:
        """Poll once: reload changed PEM files, or rotate self-signed certificates.

        True if the current or published certificates changed. A bad file never raises: it is
        logged once and the old identity kept.
        """
        if self.mode is CertificateMode.FILES:
            return self._check_files()
        return self._rotate(self._clock())

    async def wait_changed(self) -> None:
        """Return at the next change of the published certificates (tests, status pages)."""
        await self._change_event.wait()

    async def run(self, poll_interval: float) -> None:
        """Call :meth:`check` every ``poll_interval`` seconds until cancelled."""
        if poll_interval <= 0:
            raise ValueError("certificate poll interval must be positive")
        while True:
            try:
                self.check()
            except Exception:
                # A bug here must not take the relay down: the old certificate keeps serving.
                log.exception("certificate check failed; retrying in %g s", poll_interval)
            await trio.sleep(poll_interval)

    def _changed(self) -> None:
        self.generation += 1
        self._change_event.set()
        self._change_event = trio.Event()

    # -- files mode ----------------------------------------------------------------------------

    def _stat_files(self) -> tuple[FileStat, ...]:
        return tuple(_stat(path) for path in self._paths)

    def _remember(self, stats: tuple[FileStat, ...]) -> None:
        # A file written again within the file system's timestamp granularity could keep
        # this very stat: while a timestamp is that fresh, compare contents every time.
        self._stats = None if _racy(stats, time.time_ns()) else stats

    def _check_files(self) -> bool:
        stats = self._stat_files()
        if stats != self._stats:
            self._remember(stats)
            digest = _content_digest(self._paths)
            if digest != self._digest:
                self._digest = digest
                self._failure = None  # new contents: a failure is worth a new line
                return self._reload()
        if self._failure is not None:
            # Same bytes, but time may have fixed it (a certificate not valid yet).
            return self._reload()
        return False

    def _reload(self) -> bool:
        cert_pem, key_pem = self._paths
        try:
            identity = load_identity(cert_pem, key_pem, now=self._clock())
        except CertificateError as exc:
            message = str(exc)
        except Exception as exc:  # the contract: a bad file never raises
            message = f"cannot load {cert_pem}: {type(exc).__name__}: {exc}"
        else:
            self._failure = None
            if _same_identity(identity, self.current):
                return False
            self.current = identity
            self._changed()
            log.info("certificate reloaded from %s: %s", cert_pem, _describe(identity))
            return True
        if message != self._failure:
            self._failure = message
            log.warning("certificate not reloaded, keeping %s: %s", self.current.hash_hex, message)
        return False

    # -- self-signed mode ----------------------------------------------------------------------

    def _generate(self, now: datetime.datetime) -> TlsIdentity:
        """A pinnable certificate covering ``now``: backdated like ``generate_self_signed`` (but
        by at most an eighth of a short lifetime), never longer than the configured days."""
        not_before = now - min(BACKDATE, self._lifetime / 8)
        return self_signed(self.config.cert_sans, not_before, not_before + self._lifetime)

    def _rotate(self, now: datetime.datetime) -> bool:
        """One rotation step; poll often enough (far below a quarter of the lifetime)."""
        current, following = self.current, self.next
        if following is not None and not following.not_before <= now < following.not_after:
            following = None  # the clock went backwards: do not publish an unusable hash
        if not current.not_before <= now < current.not_after:
            if following is not None:
                self._promote(following, "the current one is not valid now")
            else:
                self.current, self.next = self._generate(now), None
                self._changed()
                log.warning(
                    "self-signed certificate was not valid now (clock jump?); new one: %s",
                    _describe(self.current),
                )
            return True
        lifetime = current.not_after - current.not_before
        if following is None:
            if now - current.not_before >= lifetime / 2:
                self.next = self._generate(now)
                self._changed()
                log.info("self-signed certificate: next published, %s", _describe(self.next))
                return True
            if self.next is not None:  # dropped above
                self.next = None
                self._changed()
                return True
            return False
        if current.not_after - now < lifetime / 4:
            self._promote(following, "the current one has less than a quarter left")
            return True
        return False

    def _promote(self, following: TlsIdentity, why: str) -> None:
        self.current, self.next = following, None
        self._changed()
        log.info("self-signed certificate rotated (%s): now %s", why, _describe(following))
