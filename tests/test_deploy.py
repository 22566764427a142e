"""deploy/: the systemd unit, the relay under MemoryDenyWriteExecute, the health check, and the
container image built and run with podman (a client on the host registers through it)."""

from __future__ import annotations

import http.server
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import yaml
from conftest import require_tool, skip_or_fail

from relay.client import connect, random_mac

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "relay.service"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"


# --- systemd unit ----------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit (keys may repeat), comments skipped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def local_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's relay: systemd-analyze
    verify insists that the binary exists."""
    text = UNIT.read_text()
    shipped = "ExecStart=/opt/relay/venv/bin/relay serve --data-dir ${STATE_DIRECTORY}\n"
    assert shipped in text
    local = f"ExecStart={sys.executable} -m relay serve --data-dir ${{STATE_DIRECTORY}}\n"
    unit = tmp_path / "relay.service"
    unit.write_text(text.replace(shipped, local))
    return unit


def test_unit_is_notify_with_watchdog_and_sandboxed() -> None:
    settings = unit_settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "20s",
        "DynamicUser": "yes",
        "StateDirectory": "relay",
        "ProtectSystem": "strict",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "EnvironmentFile": "-/etc/relay/relay.env",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert "ProcSubset" not in settings  # it would hide /proc/stat from prometheus-client


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = local_unit(tmp_path)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    # verify exits 0 even for unknown keys or bad values; it only prints them.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_verify_reports_mistakes(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value is reported."""
    analyze = require_tool("systemd-analyze")
    unit = local_unit(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notfy"))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert "Failed to parse service type" in result.stderr


def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = local_unit(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    score = re.search(r"Overall exposure level for relay\.service: ([0-9.]+)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {score.group(1)} > 2.0"
    assert float(score.group(1)) <= 2.0


# --- MemoryDenyWriteExecute ------------------------------------------------------------------

# Sets the kernel's PR_SET_MDWE (Linux >= 6.3; inherited by children and kept across execve):
# no mapping may be writable and executable, nor become executable. systemd's
# MemoryDenyWriteExecute= refuses the same with a seccomp filter (and newer systemd uses this).
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""

WX_PROBE = """
import mmap, sys
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    sys.exit(0)
sys.exit(1)
"""


def under_mdwe(*argv: str) -> list[str]:
    return [sys.executable, "-c", MDWE_EXEC, sys.executable, *argv]


async def read_until(stream: trio.abc.ReceiveStream, marker: str, within: float) -> str:
    """Output of ``stream`` up to and including the line that contains ``marker``."""
    text = ""
    with trio.fail_after(within):
        while not re.search(f"{re.escape(marker)}[^\n]*\n", text):
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"output ended before {marker!r}: {text}")
            text += chunk.decode(errors="replace")
    return text


def printed_hash(text: str) -> str:
    found = re.search(r"Certificate SHA-256 Hash \(hex\): ([0-9a-f]{64})", text)
    assert found is not None, text
    return found.group(1)


async def test_relay_works_with_write_execute_memory_refused(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """aioquic, pylsqpack and cryptography need no W+X memory (libffi closures would), so
    the unit's MemoryDenyWriteExecute=yes does not break a handshake and registration."""
    probe = await trio.run_process(under_mdwe("-c", WX_PROBE), check=False)
    if probe.returncode == 77:
        skip_or_fail("the kernel has no PR_SET_MDWE (Linux 6.3 or later)")
    assert probe.returncode == 0, "a W+X mapping was allowed under PR_SET_MDWE"
    command = under_mdwe("-m", "relay", "serve", "--bind", "127.0.0.1", "--port", "0")
    command += ["--data-dir", str(tmp_path / "data")]
    proc = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        text = await read_until(proc.stdout, "Listening on https://127.0.0.1:", 30)
        url = re.findall(r"Listening on (https://127\.0\.0\.1:\d+/)", text)[0]
        client = await connect(nursery, url, cert_hash=printed_hash(text))
        assigned = await client.register(random_mac())
        assert str(assigned.ip).startswith("10.0.2.")
        await client.aclose()
    finally:
        proc.terminate()
        with trio.fail_after(10):
            assert await proc.wait() == 0


# --- health check script ---------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "RELAY_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_passes_on_200_and_fails_otherwise(
    health_server: http.server.HTTPServer,
) -> None:
    port = health_server.server_address[1]
    assert run_healthcheck(port).returncode == 0
    _Health.status = 503
    try:
        result = run_healthcheck(port)
    finally:
        _Health.status = 200
    assert result.returncode == 1
    assert "did not answer 200" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert run_healthcheck(port).returncode == 1


# --- container image (podman) ----------------------------------------------------------------


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built by scripts/build-image (Debian base from debootstrap when no
    python:3.11-slim is present; that base stays cached), removed afterwards."""
    if os.geteuid() != 0:
        skip_or_fail("building and running the image needs root (rootful podman, debootstrap)")
    require_tool("podman")
    tag = f"localhost/relay-test:{secrets.token_hex(4)}"
    start = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), "--tag", tag, "--", "--layers=false"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.monotonic() - start
    print(f"scripts/build-image took {elapsed:.1f} s:\n{result.stderr}")
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().splitlines()[-1] == tag
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


def free_port() -> int:
    """A port number free for both UDP (QUIC) and TCP (the HTTP side) on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no free port")


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, int]]:
    """The image running with host networking on a free loopback port (read-only root,
    no-new-privileges, no extra options); its name and port. Removed with its volume."""
    name = f"relay-test-{secrets.token_hex(4)}"
    port = free_port()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--security-opt",
        "no-new-privileges",
        "--env",
        f"RELAY_PORT={port}",
        image,
        "--bind",
        "127.0.0.1",
        "--data-dir",
        "/data",
    )
    try:
        yield name, port
    finally:
        podman("rm", "--force", "--volumes", name, check=False)


async def container_output(name: str, marker: str) -> str:
    """The container's stdout up to the line containing ``marker`` (``podman logs -f``)."""
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    logs = await trio.lowlevel.open_process(
        ["podman", "logs", "--follow", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert logs.stdout is not None
        return await read_until(logs.stdout, marker, 60)
    finally:
        logs.kill()
        await logs.wait()


@pytest.mark.container
async def test_client_on_the_host_registers_through_the_container(
    container: tuple[str, int], nursery: trio.Nursery
) -> None:
    name, port = container
    text = await container_output(name, f"Listening on https://127.0.0.1:{port}/")
    client = await connect(nursery, f"https://127.0.0.1:{port}/", cert_hash=printed_hash(text))
    assigned = await client.register(random_mac())
    assert str(assigned.ip).startswith("10.0.2.")
    await client.aclose()


@pytest.mark.container
async def test_container_runs_unprivileged_and_stops_cleanly(container: tuple[str, int]) -> None:
    name, port = container
    await container_output(name, f"Listening on https://127.0.0.1:{port}/")
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split()[0] == "10001"
    assert int(fields["CapEff"], 16) == 0
    assert int(fields["CapPrm"], 16) == 0
    podman("stop", "--time", "10", name)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    assert "SIGTERM received" in podman("logs", name).stderr


@pytest.mark.container
async def test_container_healthcheck_reports_healthy(
    image: str, container: tuple[str, int]
) -> None:
    name, port = container
    configured = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image)
    assert "/opt/relay/healthcheck.py" in configured.stdout  # kept: built with --format docker
    await container_output(name, f"on http://127.0.0.1:{port}/")  # the HTTP side listens
    result = podman("healthcheck", "run", name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose file ----------------------------------------------------------------------------


def test_compose_file_publishes_udp_and_tcp_and_keeps_leases_in_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    relay = compose["services"]["relay"]
    assert set(relay["ports"]) == {"4433:4433/udp", "4433:4433/tcp"}
    assert "relay-data:/data" in relay["volumes"] and "relay-data" in compose["volumes"]
    assert relay["environment"]["CERT_POLL_INTERVAL"] == "60"
    assert relay["environment"]["RELAY_LOG_FORMAT"] == "json"
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    assert relay["healthcheck"]["test"][-1] == "/opt/relay/healthcheck.py"
    assert relay["build"]["dockerfile"] == "deploy/Dockerfile"
    text = (ROOT / "deploy" / "docker-compose.yml").read_text()
    for commented in ("RELAY_CERT_PEM", "RELAY_KEY_PEM", "/etc/letsencrypt:/certs:ro"):
        assert f"# {commented}" in text or f"# - {commented}" in text
