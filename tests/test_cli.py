"""The ``relay`` command line: help, certificates, and one-line errors for bad PEMs."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cryptography import x509
from typer.testing import CliRunner

from relay.cli import app
from relay.client import connect, random_mac
from relay.tls import (
    generate_self_signed,
    hash_of_pem_file,
    load_identity,
    self_signed,
    write_identity,
)

runner = CliRunner()


def relay_cmd(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        **kwargs,  # type: ignore[call-overload]
    )


def test_serve_help_lists_every_option() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--bind",
        "--port",
        "--cert-pem",
        "--key-pem",
        "--cert-san",
        "--heartbeat-interval",
        "--peer-timeout",
        "--data-dir",
        "--log-level",
        "--log-format",
        "RELAY_CERT_PEM",
        "RELAY_PEER_TIMEOUT",
    ):
        assert option in result.output, option


def test_cert_generate_and_hash(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "cert",
            "generate",
            "--out",
            str(tmp_path),
            "--days",
            "10",
            "--san",
            "relay.example",
            "--san",
            "192.0.2.1",
        ],
    )
    assert result.exit_code == 0, result.output
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    identity = load_identity(cert, key)
    assert identity.pinning_problems() == []
    assert identity.not_after - identity.not_before == datetime.timedelta(days=10)
    sans = identity.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "relay.example" in sans.value.get_values_for_type(x509.DNSName)
    assert f"Certificate SHA-256 Hash (hex): {identity.hash_hex}" in result.output
    assert f"Certificate SHA-256 Hash: {identity.hash_colon}" in result.output
    hashed = runner.invoke(app, ["cert", "hash", str(cert)])
    assert hashed.output.strip() == identity.hash_hex == hash_of_pem_file(cert)


def test_cert_generate_refuses_more_than_14_days(tmp_path: Path) -> None:
    result = runner.invoke(app, ["cert", "generate", "--out", str(tmp_path), "--days", "15"])
    assert result.exit_code != 0
    assert "14" in result.output


def _self_signed_pem(
    tmp_path: Path, name: str, start: datetime.timedelta, end: datetime.timedelta
) -> tuple[Path, Path]:
    """A self-signed P-256 certificate valid from now+start to now+end, and its key."""
    now = datetime.datetime.now(datetime.UTC)
    return write_identity(self_signed((), now + start, now + end), tmp_path / name)


def _expired_cert(tmp_path: Path) -> tuple[Path, Path]:
    day = datetime.timedelta(days=1)
    return _self_signed_pem(tmp_path, "old", -30 * day, -16 * day)


def _bad_pem_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    good_a = write_identity(generate_self_signed(), tmp_path / "a")
    good_b = write_identity(generate_self_signed(), tmp_path / "b")
    expired = _expired_cert(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return [
        (["--cert-pem", str(good_a[0])], "--cert-pem and --key-pem must be given together"),
        (
            ["--cert-pem", str(tmp_path / "nope.pem"), "--key-pem", str(good_a[1])],
            "certificate file not found",
        ),
        (["--cert-pem", str(good_a[0]), "--key-pem", str(good_b[1])], "does not match"),
        (["--cert-pem", str(expired[0]), "--key-pem", str(expired[1])], "expired on"),
        (["--cert-pem", str(garbage), "--key-pem", str(good_a[1])], "no PEM certificate"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_pems_exit_non_zero_with_one_line(tmp_path: Path, case: int) -> None:
    args, message = _bad_pem_cases(tmp_path)[case]
    result = relay_cmd("serve", "--bind", "127.0.0.1", "--port", "0", *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relay: error:") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def run_until_listening(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``relay serve`` on an ephemeral port; return it and its stdout up to Listening."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while not (lines and lines[-1].startswith("Listening on https://127.0.0.1:")):
        lines.append(proc.stdout.readline())
        if not lines[-1]:
            proc.kill()
            raise AssertionError(f"relay exited before listening: {proc.communicate()[1]}")
    return proc, lines


def stop(proc: subprocess.Popen[str], signum: int) -> str:
    """Signal the relay, wait for it, return its stderr."""
    try:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    return err


def test_serve_prints_hash_then_listens_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc, lines = run_until_listening(tmp_path, env={"RELAY_LOG_FORMAT": "json"})
    assert lines[0].startswith("Certificate SHA-256 Hash: ")
    hex_line = next(line for line in lines if "(hex)" in line)
    assert len(hex_line.split(": ", 1)[1].strip()) == 64
    err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert '"message":"SIGTERM received; closing sessions"' in err


def test_long_lived_self_signed_pem_warns_that_pinning_will_fail(tmp_path: Path) -> None:
    cert_path, key_path = _self_signed_pem(
        tmp_path, "long", -datetime.timedelta(hours=1), datetime.timedelta(days=30)
    )
    proc, _ = run_until_listening(
        tmp_path, "--cert-pem", str(cert_path), "--key-pem", str(key_path)
    )
    err = stop(proc, signal.SIGINT)
    assert proc.returncode == 0
    assert "hash pinning will fail: validity is 30.0 days" in err
    assert (tmp_path / "data").is_dir()


def test_port_in_use_is_a_one_line_error() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = relay_cmd("serve", "--bind", "127.0.0.1", "--port", str(port))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "relay: error: cannot listen: Address already in use"
    ]


async def test_sigterm_closes_live_sessions_so_clients_reconnect(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    proc, lines = run_until_listening(tmp_path)
    try:
        cert_hash = next(line for line in lines if "(hex)" in line).split(": ", 1)[1].strip()
        url = lines[-1].split()[2]
        client = await connect(nursery, url, cert_hash=cert_hash)
        await client.register(random_mac())
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            await client.closed.wait()  # told at once, not after an idle timeout
        assert client.close_reason in ("session closed by relay", "connection closed: shutdown")
        _, err = await trio.to_thread.run_sync(proc.communicate, None, 10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert "(shutdown)" in err  # the session's close reason in the relay's log
