"""One client process of ``relay bench sessions``: many idle, registered sessions in one trio run.

The runner starts ``python -m relay.bench.sessions_worker --count N ...``. The worker opens
``count`` WebTransport connections, at most ``concurrency`` handshakes at a time (so the
relay's admission sees a realistic queue: Retry above its threshold, never its half-open cap),
registers a random MAC on each, then keeps every session alive with a Heartbeat every
``heartbeat`` seconds (the relay closes sessions silent for its peer timeout).

Protocol with the runner, one JSON line each on stdout:

* ``{"event": "ready", "registered": ..., "failed": ..., ...}`` once every session is either
  registered or given up on;
* after ``stop`` (or end of file) on stdin: every session leaves politely (Disconnect, then
  CONNECTION_CLOSE), then ``{"event": "result", "lost": ..., ...}``, and the process exits 0.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

from relay.bench.procs import percentile
from relay.bench.worker import Control, cpu_seconds, emit, leaf_exception
from relay.client import RelayClient, connect, random_mac
from relay.errors import RelayError

REGISTER_TIMEOUT = 10.0
"""Seconds from a session's CONNECT answer to its Assigned before the attempt is given up."""
RETRY_BACKOFF = 0.5
"""At most this many seconds (random) between two attempts of one session."""


def lan_path(index: int, per_lan: int) -> str:
    """The LAN of session ``index``: ``per_lan`` sessions share one (a LAN's address pool is
    finite, so a thousand sessions cannot all register on one)."""
    return f"/lan/bench-idle{index // per_lan}"


@dataclass
class Tally:
    """What happened to this worker's sessions."""

    clients: list[RelayClient] = field(default_factory=list)
    setup_times: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    heartbeats_sent: int = 0


def _failure_label(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, trio.TooSlowError):
        return "register timed out"
    if "timed out" in text:
        return "handshake timed out"
    return text.split(": ", 1)[-1][:80] or type(exc).__name__


async def open_session(
    nursery: trio.Nursery, args: argparse.Namespace, index: int, tally: Tally
) -> RelayClient | None:
    """Connect and register, retrying up to ``attempts`` times; None if every try failed."""
    url = args.url.rstrip("/") + lan_path(index, args.per_lan)
    for _ in range(args.attempts):
        tally.attempts += 1
        started = time.monotonic()
        client: RelayClient | None = None
        try:
            client = await connect(nursery, url, cert_hash=args.cert_hash)
            with trio.fail_after(REGISTER_TIMEOUT):
                await client.register(random_mac())
        except (RelayError, trio.TooSlowError, OSError) as exc:
            tally.failures[_failure_label(exc)] += 1
            if client is not None:
                await client.aclose()
            await trio.sleep(random.uniform(0, RETRY_BACKOFF))  # do not come back in step
            continue
        tally.setup_times.append(time.monotonic() - started)
        return client
    return None


def _drain(client: RelayClient) -> None:
    """Discard what arrived (acks, a gateway's broadcasts) so no queue fills up."""
    for channel in (client.controls, client.frames):
        while True:
            try:
                channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break


async def keep_alive(client: RelayClient, interval: float, tally: Tally) -> None:
    """Heartbeat every ``interval`` s, the first at a random point so they do not bunch up."""
    await trio.sleep(random.uniform(0, interval))
    while not client.closed.is_set():
        _drain(client)
        try:
            client.heartbeat()
        except RelayError:
            return
        tally.heartbeats_sent += 1
        with trio.move_on_after(interval):
            await client.closed.wait()


async def hold_sessions(args: argparse.Namespace) -> None:
    tally = Tally()
    control = Control()
    cpu_before = cpu_seconds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.read)
        limiter = trio.CapacityLimiter(args.concurrency)
        started = time.monotonic()

        async def one(index: int) -> None:
            async with limiter:
                client = await open_session(nursery, args, index, tally)
            if client is not None:
                tally.clients.append(client)
                nursery.start_soon(keep_alive, client, args.heartbeat, tally)

        async with trio.open_nursery() as openers:
            for i in range(args.count):
                openers.start_soon(one, args.first + i)
        emit(
            "ready",
            registered=len(tally.clients),
            failed=args.count - len(tally.clients),
            attempts=tally.attempts,
            failures=dict(tally.failures),
            setup_seconds=time.monotonic() - started,
            setup_p50_ms=1000 * percentile(tally.setup_times, 0.5),
            setup_p99_ms=1000 * percentile(tally.setup_times, 0.99),
            cpu=cpu_seconds() - cpu_before,
        )
        await control.stop.wait()
        lost = Counter(c.close_reason for c in tally.clients if c.closed.is_set())
        acks = sum(c.stats.heartbeat_acks for c in tally.clients)
        for client in tally.clients:
            await client.aclose()
        emit(
            "result",
            registered=len(tally.clients),
            lost=sum(lost.values()),
            lost_reasons=dict(lost),
            heartbeats_sent=tally.heartbeats_sent,
            heartbeat_acks=acks,
            cpu=cpu_seconds() - cpu_before,
        )
        nursery.cancel_scope.cancel()


def _raise_file_limit() -> None:
    """One UDP socket per connection: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m relay.bench.sessions_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="https://host:port of the relay")
    parser.add_argument("--cert-hash", required=True)
    parser.add_argument("--count", type=int, required=True, help="sessions to hold")
    parser.add_argument("--first", type=int, default=0, help="global index of the first one")
    parser.add_argument("--per-lan", type=int, default=200, help="sessions per LAN")
    parser.add_argument("--concurrency", type=int, default=20, help="handshakes at a time")
    parser.add_argument("--heartbeat", type=float, default=20.0, help="seconds between them")
    parser.add_argument("--attempts", type=int, default=8, help="tries per session")
    args = parser.parse_args(argv)
    for name in ("count", "per_lan", "concurrency", "attempts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.heartbeat) and args.heartbeat > 0):
        parser.error("--heartbeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _raise_file_limit()
    try:
        trio.run(hold_sessions, args)
    except BaseException as exc:
        leaf = leaf_exception(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if isinstance(leaf, RelayError | OSError):
            print(f"bench sessions worker: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
