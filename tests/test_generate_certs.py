"""scripts/generate-certs.sh: the openssl twin of ``relay cert generate``.

The script's certificate must satisfy the same rules as the relay's own (ECDSA P-256, at most
14 days, SANs for the local addresses), and the hash it prints must be the one the relay and
the browsers compute: SHA-256 of the DER certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.tls import hash_of_pem_file, load_identity

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "generate-certs.sh"


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    require_tool("openssl")
    environment = {k: v for k, v in os.environ.items() if k != "DAYS"}
    environment.update(env or {})
    return subprocess.run(
        ["bash", "-c", 'umask 022 && exec bash "$0" "$@"', str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def printed(stdout: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}: (\S+)$", stdout, re.MULTILINE)
    assert match is not None, f"no {label!r} line in:\n{stdout}"
    return match.group(1)


def test_certificate_is_pinnable_and_hash_matches(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    before = datetime.datetime.now(datetime.UTC)
    result = run_script("--out", str(out), "--san", "relay.example", "--san", "192.0.2.7")
    assert result.returncode == 0, result.stderr
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    assert cert_path.is_file()
    assert key_path.is_file()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # The directory and certificate follow the caller's umask (022 here), so a container's
    # user can read the certificate; only the key is private.
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644

    hex_hash = printed(result.stdout, "Certificate SHA-256 Hash (hex)")
    colon_hash = printed(result.stdout, "Certificate SHA-256 Hash")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der_hash = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert hex_hash == der_hash
    assert hex_hash == hash_of_pem_file(cert_path)
    assert colon_hash == ":".join(re.findall("..", hex_hash))

    identity = load_identity(cert_path, key_path)
    assert identity.pinning_problems() == []
    assert identity.self_signed
    assert identity.hash_hex == hex_hash
    assert cert.version is x509.Version.v3
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"

    validity = identity.not_after - identity.not_before
    assert validity <= datetime.timedelta(days=14)
    assert validity == datetime.timedelta(days=14)  # the default
    assert identity.not_before < before  # backdated, so a slow client clock still accepts it

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = set(sans.get_values_for_type(x509.IPAddress))
    dns = set(sans.get_values_for_type(x509.DNSName))
    expected_ips = {"127.0.0.1", "::1", "10.0.2.2", "192.0.2.7"}
    assert {ipaddress.ip_address(ip) for ip in expected_ips} <= ips
    assert {"localhost", "relay", "relay.example"} <= dns
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca


def test_days_and_env(tmp_path: Path) -> None:
    result = run_script("--out", str(tmp_path), env={"DAYS": "3"})
    assert result.returncode == 0, result.stderr
    identity = load_identity(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert identity.not_after - identity.not_before == datetime.timedelta(days=3)

    result = run_script("--out", str(tmp_path), "--days", "1", env={"DAYS": "3"})
    assert result.returncode == 0, result.stderr
    identity = load_identity(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert identity.not_after - identity.not_before == datetime.timedelta(days=1)


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--days", "15"), {}), (("--days=30",), {}), ((), {"DAYS": "15"})],
    ids=["--days 15", "--days=30", "DAYS=15"],
)
def test_more_than_14_days_is_refused(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    out = tmp_path / "certs"
    result = run_script("--out", str(out), *args, env=env)
    assert result.returncode != 0
    assert "14 days" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [("--days", "0"), ("--days", "two"), ("--san", "a,b"), ("--san", "300.1.2.3"), ("--bogus",)],
)
def test_bad_arguments_are_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = tmp_path / "certs"
    result = run_script("--out", str(out), *args)
    assert result.returncode != 0
    assert "error:" in result.stderr
    assert not out.exists()


def test_rerun_replaces_the_pair(tmp_path: Path) -> None:
    first = run_script("--out", str(tmp_path))
    second = run_script("--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    label = "Certificate SHA-256 Hash (hex)"
    assert printed(first.stdout, label) != printed(second.stdout, label)
    assert printed(second.stdout, label) == hash_of_pem_file(tmp_path / "cert.pem")
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    load_identity(tmp_path / "cert.pem", tmp_path / "key.pem")
