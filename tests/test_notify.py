"""systemd notification: READY/STATUS/WATCHDOG/STOPPING datagrams on a socket the test owns."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from relay.ops.notify import Notifier, run_watchdog, watchdog_interval


def _short_dir() -> str:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer than that.
    return tempfile.mkdtemp(prefix="notify-", dir="/tmp")


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    directory = None
    if request.param == "path":
        directory = _short_dir()
        address = os.path.join(directory, "notify")
        sock.bind(address)
    else:
        name = f"relay-test-{secrets.token_hex(8)}"
        sock.bind("\0" + name)
        address = "@" + name
    try:
        yield sock, address
    finally:
        sock.close()
        if directory is not None:
            os.unlink(os.path.join(directory, "notify"))
            os.rmdir(directory)


async def receive(sock: socket.socket, within: float = 5.0) -> str:
    """The next datagram, waiting at most ``within`` seconds."""
    with trio.fail_after(within):
        await trio.lowlevel.wait_readable(sock)
    return sock.recv(65536).decode()


def pending(sock: socket.socket) -> list[str]:
    """Datagrams already queued on ``sock`` (without waiting)."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            return out


async def test_ready_status_watchdog_stopping_arrive(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("Listening on udp 127.0.0.1:4433")
    assert await receive(sock) == "READY=1\nSTATUS=Listening on udp 127.0.0.1:4433"
    assert notifier.status("2 peers\non 1 LAN")
    assert await receive(sock) == "STATUS=2 peers on 1 LAN"  # a newline would be a new field
    assert notifier.watchdog()
    assert await receive(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert await receive(sock) == "STOPPING=1"
    assert (notifier.sent, notifier.errors) == (4, 0)
    notifier.close()


async def test_watchdog_pings_at_half_the_period(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    interval = watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert interval == pytest.approx(0.1)
    with Notifier(address) as notifier:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_watchdog, notifier, interval)
            times = []
            for _ in range(4):
                assert await receive(sock) == "WATCHDOG=1"
                times.append(trio.current_time())
            nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.09 for gap in gaps), gaps
    assert sum(gaps) / len(gaps) < 1.0, gaps


async def test_watchdog_stays_silent_while_the_event_loop_is_blocked(
    listener: tuple[socket.socket, str],
) -> None:
    """The point of pinging from a trio task: a stalled loop stops the pings."""
    sock, address = listener
    with Notifier(address) as notifier:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_watchdog, notifier, 0.02)
            assert await receive(sock) == "WATCHDOG=1"
            pending(sock)
            time.sleep(0.3)  # noqa: ASYNC251 -- the stall under test: 15 ping periods
            assert pending(sock) == []  # no checkpoint since: nothing could have pinged
            assert await receive(sock) == "WATCHDOG=1"  # and pings resume with the loop
            nursery.cancel_scope.cancel()


def test_watchdog_interval_from_environment() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(pid)}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}) is None


async def test_wrong_watchdog_pid_means_no_pings(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = listener
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    with Notifier(address) as notifier:
        with trio.fail_after(5):
            await run_watchdog(notifier)  # returns at once instead of pinging forever
        assert pending(sock) == []
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_watchdog, notifier)
            assert await receive(sock) == "WATCHDOG=1"  # the same set-up pings with our pid
            nursery.cancel_scope.cancel()


async def test_without_notify_socket_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.status("x")
    assert (notifier.sent, notifier.errors) == (0, 0)
    with trio.fail_after(5):
        await run_watchdog(notifier)


def test_send_failures_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    directory = _short_dir()
    try:
        notifier = Notifier(os.path.join(directory, "nobody-listens"))
        with caplog.at_level(logging.WARNING, logger="relay.notify"):
            assert not notifier.ready()
            assert not notifier.watchdog()
            assert not notifier.watchdog()
        assert notifier.errors == 3
        assert notifier.sent == 0
        warnings = [r for r in caplog.records if r.name == "relay.notify"]
        assert len(warnings) == 1
        assert "cannot notify" in warnings[0].getMessage()
        notifier.close()
    finally:
        os.rmdir(directory)


def test_unusable_address_disables_notification(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.notify"):
        notifier = Notifier("relative/path")
    assert not notifier.enabled
    assert not notifier.ready()
    assert "neither an absolute path nor @abstract" in caplog.text


@contextmanager
def running_relay(
    tmp_path: Path, notify_address: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``relay serve`` on an ephemeral loopback port, notifying ``notify_address``; always
    killed and reaped at the end."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "NOTIFY_"))}
    environ.update({"NOTIFY_SOCKET": notify_address, **(env or {})})
    command = [sys.executable, "-m", "relay", "serve", "--bind", "127.0.0.1", "--port", "0"]
    command += ["--data-dir", str(tmp_path / "data")]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ
    ) as proc:
        try:
            yield proc
        finally:
            proc.kill()
            proc.communicate()


def _receive_blocking(sock: socket.socket, proc: subprocess.Popen[str], timeout: float) -> str:
    """The next datagram from the relay; fails early if the relay exits without sending one."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while True:
        try:
            return sock.recv(65536).decode()
        except TimeoutError:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"relay exited ({proc.returncode}): {err}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"no notification within {timeout:.0f} s") from None


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait for the exit, return stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return err


def test_relay_sends_ready_over_notify_socket(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    """The real ``relay serve``: READY=1 only once it listens, then STOPPING=1 on SIGTERM."""
    sock, address = listener
    with running_relay(tmp_path, address) as proc:
        message = _receive_blocking(sock, proc, 20)
        assert proc.stdout is not None
        # READY=1 is sent after "Listening on" was printed and flushed, so that line is
        # already in the pipe: read what is there without waiting.
        os.set_blocking(proc.stdout.fileno(), False)
        printed = proc.stdout.read() or ""
        os.set_blocking(proc.stdout.fileno(), True)
        assert "READY=1" in message.splitlines(), message
        assert "Listening on https://127.0.0.1:" in printed, (message, printed)
        proc.send_signal(signal.SIGTERM)
        messages = [_receive_blocking(sock, proc, 10)]
        while not any("STOPPING=1" in m.splitlines() for m in messages):
            messages.append(_receive_blocking(sock, proc, 10))
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_relay_feeds_the_watchdog(tmp_path: Path, listener: tuple[socket.socket, str]) -> None:
    """With ``WatchdogSec=`` (WATCHDOG_USEC) the running relay keeps sending WATCHDOG=1."""
    sock, address = listener
    with running_relay(tmp_path, address, {"WATCHDOG_USEC": "400000"}) as proc:
        pings = 0
        deadline = time.monotonic() + 30  # the 200 ms ping period makes 3 pings take 0.4 s
        while pings < 3:
            message = _receive_blocking(sock, proc, max(0.0, deadline - time.monotonic()))
            pings += message.splitlines().count("WATCHDOG=1")
        err = _stop(proc)
    assert proc.returncode == 0, err
