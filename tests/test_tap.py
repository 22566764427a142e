"""``relay tap`` as a command: URL building, MAC parsing, retrying and a clean exit."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio
from netns import require_netns, sh, unique

from relay.tap.attach import lan_url
from relay.wire.messages import parse_mac


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


async def test_unreachable_relay_is_retried_and_sigterm_exits_cleanly() -> None:
    require_netns()  # creating the TAP device needs root
    dev = unique("rt")
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "relay",
            "tap",
            "--url",
            "https://127.0.0.1:9/",
            "--cert-hash",
            "00" * 32,
            "--dev",
            dev,
        ],
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
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert b"Traceback" not in seen + await process.stderr.receive_some(65536)
    finally:
        if process.returncode is None:
            process.kill()
        sh("ip", "link", "del", dev, check=False)


def test_no_permission_is_one_line(tmp_path: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "tap", "--url", "https://127.0.0.1:9/", "--dev", "x" * 20],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("relay: error: ") and done.stderr.count("\n") == 1
