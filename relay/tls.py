"""Certificates: an ephemeral self-signed identity for development, PEM files for production.

Browsers accept a ``serverCertificateHashes`` pin only for an X.509v3 ECDSA P-256 certificate
with at least one extension, valid for at most 14 days in total and valid now. The generated
identity follows those rules: not_before one hour back, total validity 13 days by default.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from relay.errors import CertificateError

MAX_PINNED_VALIDITY = datetime.timedelta(days=14)
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
BACKDATE = datetime.timedelta(hours=1)

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class TlsIdentity:
    """A leaf certificate, its chain and its key, ready for aioquic."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    self_signed: bool
    source: str
    """Where it came from: ``generated`` or the certificate file's path."""

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the DER leaf certificate: what ``serverCertificateHashes`` pins."""
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).digest()

    @property
    def hash_hex(self) -> str:
        return self.sha256.hex()

    @property
    def hash_colon(self) -> str:
        return ":".join(f"{b:02x}" for b in self.sha256)

    @property
    def not_before(self) -> datetime.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    def pinning_problems(self) -> list[str]:
        """Why a browser would refuse to pin this certificate's hash (empty if it would)."""
        problems = []
        if self.not_after - self.not_before > MAX_PINNED_VALIDITY + datetime.timedelta(seconds=1):
            days = (self.not_after - self.not_before).total_seconds() / 86400
            problems.append(f"validity is {days:.1f} days; hash pinning allows at most 14")
        key = self.certificate.public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
            problems.append("key is not ECDSA P-256; browsers refuse to pin it")
        return problems


def generate_self_signed(
    sans: Sequence[str] = (),
    days: float = 13.0,
    now: datetime.datetime | None = None,
) -> TlsIdentity:
    """A fresh ECDSA P-256 certificate for localhost, 127.0.0.1, ::1 and ``sans``, pinnable."""
    if not 0 < days <= 14:
        raise CertificateError(f"self-signed validity must be within (0, 14] days, not {days}")
    not_before = (now or _utcnow()) - BACKDATE
    return self_signed(sans, not_before, not_before + datetime.timedelta(days=days))


def self_signed(
    sans: Sequence[str], not_before: datetime.datetime, not_after: datetime.datetime
) -> TlsIdentity:
    """A self-signed ECDSA P-256 certificate with exactly these dates (no pinning checks)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for san in dict.fromkeys((*DEFAULT_SANS, *sans)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(cert, (), key, self_signed=True, source="generated")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {what} file {path}: {exc.strerror}") from None


def load_identity(
    cert_pem: Path, key_pem: Path, now: datetime.datetime | None = None
) -> TlsIdentity:
    """Load a certificate chain and its key; every failure is a one-line CertificateError."""
    cert_data = _read(cert_pem, "certificate")
    key_data = _read(key_pem, "key")
    try:
        certs = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise CertificateError(f"no PEM certificate in {cert_pem}") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"cannot load private key from {key_pem}: {exc}") from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CertificateError(f"unsupported private key type in {key_pem}")
    leaf = certs[0]
    leaf_public = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if leaf_public != key_public:
        raise CertificateError(f"key {key_pem} does not match certificate {cert_pem}")
    now = now or _utcnow()
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            f"certificate {cert_pem} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            f"certificate {cert_pem} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    self_signed = leaf.issuer == leaf.subject and len(certs) == 1
    return TlsIdentity(leaf, tuple(certs[1:]), key, self_signed=self_signed, source=str(cert_pem))


def write_identity(identity: TlsIdentity, out_dir: Path) -> tuple[Path, Path]:
    """Write ``cert.pem`` (chain included) and ``key.pem`` (mode 0600) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / "cert.pem", out_dir / "key.pem"
    cert_path.write_bytes(
        b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (identity.certificate, *identity.chain)
        )
    )
    key_bytes = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(key_bytes)
    return cert_path, key_path


def hash_of_pem_file(path: Path) -> str:
    """The SHA-256 (hex) of the first certificate in a PEM file."""
    data = _read(path, "certificate")
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise CertificateError(f"no PEM certificate in {path}") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
