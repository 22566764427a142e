"""``relay tap`` with real kernels: namespaces joined to relay LANs through TAP devices, static
addressing from Register alone (no DHCP), LAN isolation, MTU drops, and the command's exits."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import StartRelay, relay_url, require_tool
from netns import Netns, namespaces, require_netns, sh, tap_into, unique
from typer.testing import CliRunner

from relay.cli import app
from relay.tap.attach import lan_url
from relay.wire.messages import parse_mac

NOBODY = "65534"


def tap_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", "tap", *args]


TUN = Path("/dev/net/tun")
# Debian's udev makes /dev/net/tun 0666 (opening it grants nothing: creating a device needs
# CAP_NET_ADMIN, attaching needs ownership). Where a machine made it 0600, the unprivileged
# command runs in a mount namespace of its own with a 0666 node of the same device bound
# over it, so the test sees what a stock Debian host has, without changing the host.
STOCK_TUN = """set -e
node=$(mktemp -d)/tun
mknod -m 0666 "$node" c 10 200
mount --bind "$node" /dev/net/tun
exec "$@"
"""


def as_nobody(setpriv: str, command: list[str]) -> list[str]:
    """``command`` run as user nobody with no capabilities at all."""
    ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
    argv = [setpriv, *ids, *command]
    if TUN.stat().st_mode & 0o006 != 0o006:
        isolate = ["unshare", "--mount", "--propagation", "private", "sh", "-c", STOCK_TUN, "sh"]
        return [*isolate, *argv]
    return argv


def test_lan_url() -> None:
    assert lan_url("https://h:4433/", None) == "https://h:4433/"
    assert lan_url("https://h:4433/", "blue") == "https://h:4433/lan/blue"
    assert lan_url("https://h:4433", "blue") == "https://h:4433/lan/blue"


def test_parse_mac() -> None:
    assert parse_mac("52:54:00:ab:CD:ef") == bytes.fromhex("525400abcdef")
    assert parse_mac("52-54-00-ab-cd-ef") == bytes.fromhex("525400abcdef")
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "525400abcdef", ""):
        with pytest.raises(ValueError, match="not a MAC"):
            parse_mac(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://h:1/"], "--url must be https://host:port/"),
        (["--url", "https://h:1/", "--cert-hash", "zz"], "certificate hash is not hex"),
        (["--url", "https://h:1/", "--cert-hash", "ab:cd"], "must be 32 bytes"),
        (["--url", "https://h:1/", "--mac", "52:54:00"], "not a MAC address"),
        (["--url", "https://h:1/", "--mac", "01:00:5e:00:00:01"], "is a multicast address"),
        (["--url", "https://h:1/", "--cafile", "/nonexistent/ca.pem"], "not a readable file"),
        (["--url", "https://h:1/", "--dev", "x" * 20], "bad interface name"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["tap", *args])
    assert result.exit_code == 2
    assert result.output.startswith("relay: error: ") and result.output.count("\n") == 1
    assert message in result.output


def test_creating_a_device_without_cap_net_admin_is_a_one_line_error() -> None:
    require_netns()
    setpriv = require_tool("setpriv")
    dev = unique("rt")
    done = subprocess.run(
        as_nobody(setpriv, tap_cmd("--url", "https://127.0.0.1:9/", "--dev", dev)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"relay: error: cannot attach TAP {dev}: Operation not permitted "
        "(CAP_NET_ADMIN is needed to create it)\n"
    )


async def test_an_unprivileged_user_attaches_a_persistent_device_it_owns(
    start_relay: StartRelay,
) -> None:
    """CAP_NET_ADMIN only creates the device: its owner runs ``relay tap`` without it."""
    require_netns()
    setpriv = require_tool("setpriv")
    relay = await start_relay()
    dev = unique("rt")
    colon_hash = relay.identity.hash_colon  # the form `relay cert generate` prints
    sh("ip", "tuntap", "add", "dev", dev, "mode", "tap", "user", NOBODY)
    try:
        process = await trio.lowlevel.open_process(
            as_nobody(
                setpriv,
                tap_cmd("--dev", dev, "--url", relay_url(relay), "--cert-hash", colon_hash),
            ),
            stdout=subprocess.PIPE,
        )
        try:
            line = await _first_line(process)
            assert line.startswith(f"Attached {dev} (") and line.endswith(" as 10.0.2.254")
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        sh("ip", "link", "del", dev, check=False)


class _Boom(Exception):
    pass


@pytest.mark.netns
async def test_the_harness_removes_namespaces_links_and_processes_even_on_failure() -> None:
    dev = unique("rt")
    made: list[tuple[Netns, trio.Process]] = []

    async def fail_inside() -> None:
        async with namespaces(1) as (ns,):
            made.append((ns, await ns.popen("sleep", "60")))
            sh("ip", "tuntap", "add", "dev", dev, "mode", "tap")
            ns.move_in(dev)
            assert "UP" in ns.run("ip", "-br", "link", "show", dev).stdout
            assert ns.run("ip", "-br", "link", "show", "lo").stdout.split()[1] == "UNKNOWN"
            assert sh("ip", "link", "show", dev, check=False).returncode != 0  # moved away
            raise _Boom

    with pytest.raises(_Boom):
        await fail_inside()
    ((ns, sleeper),) = made
    assert sleeper.returncode == -signal.SIGKILL
    assert ns.name.startswith("relay-t-")
    assert ns.name not in sh("ip", "netns", "list").stdout
    assert sh("ip", "link", "show", dev, check=False).returncode != 0  # gone with it


@pytest.mark.netns
async def test_namespaces_on_one_lan_ping_each_other_and_another_lan_is_apart(
    start_relay: StartRelay,
) -> None:
    require_tool("ping")
    relay = await start_relay()
    url, h = relay_url(relay), relay.identity.hash_hex
    async with (
        namespaces(3) as (ns1, ns2, ns3),
        tap_into(ns1, url, h) as tap1,
        tap_into(ns2, url, h) as tap2,
        tap_into(ns3, url, h, ["--lan", "other"]) as tap3,
    ):
        assert tap3.url.endswith("/lan/other")
        for ns, tap in ((ns1, tap1), (ns2, tap2), (ns3, tap3)):
            ns.run("ip", "addr", "add", f"{tap.ip}/24", "dev", tap.dev)
        assert tap1.ip != tap2.ip

        assert await ns1.ping(tap2.ip)
        assert await ns2.ping(tap1.ip)
        neigh = ns1.run("ip", "neigh", "show", "dev", tap1.dev).stdout
        assert f"{tap2.ip} lladdr {tap2.mac}" in neigh

        # The other LAN's pool starts afresh, so ns3 may hold ns1's address; ns2's is not it.
        assert tap3.ip != tap2.ip
        assert not await ns3.ping(tap2.ip, count=2, wait=1)
        assert tap3.mac not in ns2.run("ip", "neigh").stdout  # its ARP requests never arrived
        if tap3.ip != tap1.ip:
            assert not await ns2.ping(tap3.ip, count=2, wait=1)
    for tap in (tap1, tap2, tap3):
        assert tap.process.returncode == 0  # SIGTERM from the harness: a clean exit


@pytest.mark.netns
async def test_frames_above_the_mtu_set_inside_the_namespace_are_dropped(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """The kernel would take a 1442-byte frame on an MTU 936 device; the tool must not hand
    it over. It reads the MTU in the namespace the device was moved to."""
    require_tool("ping")
    relay = await start_relay()
    url, h, log = relay_url(relay), relay.identity.hash_hex, tmp_path / "tap1.log"
    async with (
        namespaces(2) as (ns1, ns2),
        tap_into(ns1, url, h, log=log) as tap1,
        tap_into(ns2, url, h) as tap2,
    ):
        for ns, tap in ((ns1, tap1), (ns2, tap2)):
            ns.run("ip", "addr", "add", f"{tap.ip}/24", "dev", tap.dev)
        ns1.run("ip", "link", "set", tap1.dev, "mtu", "936")
        assert await ns2.ping(tap1.ip, "-s", "800", "-M", "do")  # 842-byte frames
        assert not await ns2.ping(tap1.ip, "-s", "1400", "-M", "do", count=2, wait=1)
        assert await ns1.ping(tap2.ip, "-s", "800")
    text = log.read_text()
    assert f"{tap1.dev}: dropped (oversized): frame of 1442 bytes exceeds MTU 936 + 14" in text


@pytest.mark.netns
async def test_a_deleted_device_ends_the_command_with_one_line(
    start_relay: StartRelay,
) -> None:
    require_netns()
    relay = await start_relay()
    dev = unique("rt")
    process = await trio.lowlevel.open_process(
        tap_cmd("--dev", dev, "--url", relay_url(relay), "--cert-hash", relay.identity.hash_hex),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert (await _first_line(process)).startswith(f"Attached {dev} ")
        sh("ip", "link", "del", dev)
        with trio.fail_after(10):
            assert await process.wait() == 1
        assert process.stderr is not None
        errors = (await process.stderr.receive_some(65536)).decode()
        assert errors.endswith(
            f"relay: error: TAP device {dev} is gone: File descriptor in bad state\n"
        )
        assert "Traceback" not in errors
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_unreachable_relay_is_retried_and_sigterm_exits_cleanly() -> None:
    require_netns()  # creating the TAP device needs root
    dev = unique("rt")
    process = await trio.lowlevel.open_process(
        tap_cmd("--url", "https://127.0.0.1:9/", "--cert-hash", "00" * 32, "--dev", dev),
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = b""
    try:
        with trio.fail_after(30):
            while seen.count(b"reconnecting") < 2:  # it keeps trying, with backoff
                chunk = await process.stderr.receive_some(4096)
                assert chunk, seen
                seen += chunk
        assert b"connection refused" in seen
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert b"Traceback" not in seen + await process.stderr.receive_some(65536)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        sh("ip", "link", "del", dev, check=False)


async def _first_line(process: trio.Process, seconds: float = 30) -> str:
    """The first line the command prints on stdout (the ``Attached`` line)."""
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(seconds):
        while b"\n" not in seen:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"relay tap exited: {seen!r}"
            seen += chunk
    return seen.split(b"\n", 1)[0].decode()
