"""``relay bench sessions``: the relay's memory with many idle, registered sessions.

The relay runs as its own process (``python -m relay serve``, log level info), so its
``VmRSS`` in ``/proc/<pid>/status`` is its memory alone. Then:

1. RSS of the idle relay, after one warm-up session has registered and left;
2. ``workers`` client processes (:mod:`relay.bench.sessions_worker`) open ``count``
   WebTransport connections between them, one registered session (random MAC) each,
   ``concurrency`` handshakes at a time per worker; ``per_lan`` sessions share a LAN
   (``/lan/bench-idle<N>``), as one LAN's address pool cannot hold a thousand;
3. once all are registered they idle, heartbeating, for ``hold`` seconds;
4. RSS again: the target is "1000 idle registered sessions ≤ 200 MB RSS", whole process;
5. the workers leave (Disconnect); the relay's log must show every session closed, and the
   workers must exit cleanly.

The verdict for another ``count`` keeps the idle relay's RSS and scales the sessions' share
of the 200 MB linearly: PASS iff RSS at 1000 sessions, projected from the measured KiB per
session, is at most 200 MB (for ``count`` = 1000 exactly "RSS ≤ 200 MB").
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from relay.bench.procs import (
    STARTUP_TIMEOUT,
    BenchError,
    Child,
    Server,
    python,
    start_relay,
    tail,
)
from relay.bench.sessions_worker import REGISTER_TIMEOUT, lan_path
from relay.client import connect, random_mac
from relay.errors import RelayError

TARGET_SESSIONS = 1000
TARGET_RSS = 200 * 1000 * 1000
"""200 MB (decimal: the stricter reading) for :data:`TARGET_SESSIONS` sessions."""
SETTLE = 1.0
"""Seconds the relay idles after the warm-up session before its RSS is read."""
SETUP_BUDGET_PER_SESSION = 0.25
"""Seconds per session (on top of :data:`STARTUP_TIMEOUT`) before set-up is declared stuck;
a loaded 2-core VM manages several sessions a second."""
CLOSE_TIMEOUT = 30.0
"""Seconds the workers and the relay get to close every session."""

_REGISTERED = re.compile(rb": registered [0-9a-fA-F:]{17} as ")
_CLOSED = re.compile(rb": session closed \(")


@dataclass(frozen=True, slots=True)
class SessionsParams:
    count: int = 1000
    workers: int = 4
    hold: float = 10.0
    concurrency: int = 20
    """Handshakes in flight per worker."""
    per_lan: int = 200
    heartbeat: float = 20.0

    def check(self) -> None:
        """BenchError for a setting that cannot run."""
        if self.count < 1:
            raise BenchError("count must be at least 1")
        if not 1 <= self.workers <= self.count:
            raise BenchError("workers must be within 1-count")
        if not (math.isfinite(self.hold) and self.hold >= 0):
            raise BenchError("hold must be zero or more seconds")
        if self.concurrency < 1:
            raise BenchError("concurrency must be at least 1")
        if not 1 <= self.per_lan <= 240:
            raise BenchError("per-LAN sessions must be within 1-240 (a LAN's address pool)")
        if not (math.isfinite(self.heartbeat) and self.heartbeat > 0):
            raise BenchError("heartbeat must be positive")

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "workers": self.workers,
            "hold": self.hold,
            "concurrency": self.concurrency,
            "per_lan": self.per_lan,
            "heartbeat": self.heartbeat,
        }


def shares(count: int, workers: int) -> list[int]:
    """``count`` split over ``workers`` as evenly as possible."""
    base, extra = divmod(count, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def log_counts(path: Path) -> tuple[int, int]:
    """Sessions registered and sessions closed, as the relay's log tells."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0, 0
    return len(_REGISTERED.findall(data)), len(_CLOSED.findall(data))


def verdict(rss_before: int, rss_after: int, sessions: int) -> dict[str, Any]:
    """The memory figures of ``sessions`` registered sessions, and PASS/FAIL against the
    target scaled as the module says."""
    delta = rss_after - rss_before
    per_session = delta / sessions if sessions else math.nan
    projected = rss_before + per_session * TARGET_SESSIONS
    limit = rss_before + (TARGET_RSS - rss_before) * sessions / TARGET_SESSIONS
    return {
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_delta": delta,
        "kib_per_session": per_session / 1024,
        "rss_limit": limit,
        "projected_rss_at_1000": projected,
        "target_rss_at_1000": TARGET_RSS,
        "passed": bool(sessions) and rss_after <= limit,
    }


def _worker_command(server: Server, params: SessionsParams, first: int, count: int) -> list[str]:
    return [
        python(),
        "-m",
        "relay.bench.sessions_worker",
        "--url",
        server.url,
        "--cert-hash",
        server.cert_hash,
        "--count",
        str(count),
        "--first",
        str(first),
        "--per-lan",
        str(params.per_lan),
        "--concurrency",
        str(params.concurrency),
        "--heartbeat",
        repr(params.heartbeat),
    ]


async def _read_all(children: list[Child], event: str, limit: float) -> list[dict[str, Any]]:
    """One ``event`` from each child, within ``limit`` seconds in all."""
    messages: list[dict[str, Any]] = []
    with trio.move_on_after(limit) as scope:
        for child in children:
            messages.append(await child.read_event(event))
    if scope.cancelled_caught:
        tails = "\n".join(f"--- {c.name}:\n{tail(c.log_path, 5)}" for c in children)
        raise BenchError(f"no {event!r} from the workers after {limit:g} s:\n{tails}")
    return messages


async def _wait_for_closes(log_path: Path, registered: int) -> tuple[int, int]:
    """Poll the relay's log (another process: no event to wait on) until it shows at least
    ``registered`` sessions and every one closed, or :data:`CLOSE_TIMEOUT` passes."""
    give_up = time.monotonic() + CLOSE_TIMEOUT
    while True:
        seen, closed = log_counts(log_path)
        if closed >= max(seen, registered) or time.monotonic() >= give_up:
            return seen, closed
        await trio.sleep(0.2)


def _sum(messages: list[dict[str, Any]], key: str) -> float:
    return sum(float(m.get(key, 0)) for m in messages)


def _worst(messages: list[dict[str, Any]], key: str) -> float:
    """The largest finite value of ``key`` over the workers (NaN if none has one)."""
    values = [float(m[key]) for m in messages if m.get(key) is not None]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


async def warm_up(server: Server, per_lan: int) -> None:
    """One session registers and leaves before the baseline is read, so the figures count
    what each session costs, not the first session's one-off allocations (the first LAN,
    the lease database, code imported on first use)."""
    problem: str | None = None
    async with trio.open_nursery() as nursery:  # raise after it: it would wrap the error
        try:
            client = await connect(
                nursery, server.url + lan_path(0, per_lan), cert_hash=server.cert_hash
            )
        except RelayError as exc:
            problem = str(exc)
        else:
            try:
                with trio.fail_after(REGISTER_TIMEOUT):
                    await client.register(random_mac())
            except (RelayError, trio.TooSlowError) as exc:
                problem = str(exc) or "no Assigned in time"
            finally:
                await client.aclose()
    if problem is not None:
        raise server.child.failure(f"refused the warm-up session: {problem}")
    await _wait_for_closes(server.child.log_path, 1)


async def measure(params: SessionsParams, workdir: Path) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    server = await start_relay(workdir, log_level="info")
    children: list[Child] = []
    try:
        at_start = server.memory()
        await warm_up(server, params.per_lan)
        warm_seen, warm_closed = log_counts(server.child.log_path)
        await trio.sleep(SETTLE)
        before = server.memory()
        cpu_before, started = server.cpu(), time.monotonic()
        first = 0
        for i, share in enumerate(shares(params.count, params.workers)):
            command = _worker_command(server, params, first, share)
            children.append(await Child.start(f"sessions{i}", command, workdir))
            first += share
        setup_budget = STARTUP_TIMEOUT + SETUP_BUDGET_PER_SESSION * params.count
        ready = await _read_all(children, "ready", setup_budget)
        setup_wall, setup_cpu = time.monotonic() - started, server.cpu() - cpu_before
        server.check_alive("while the sessions were set up")
        registered = int(_sum(ready, "registered"))
        relay_registered = log_counts(server.child.log_path)[0] - warm_seen

        cpu_before = server.cpu()
        await trio.sleep(params.hold)  # the measured idle period itself
        hold_cpu = server.cpu() - cpu_before
        server.check_alive("while the sessions idled")
        after = server.memory()

        for child in children:
            await child.send("stop")
        results = await _read_all(children, "result", CLOSE_TIMEOUT)
        with trio.move_on_after(CLOSE_TIMEOUT):
            for child in children:
                await child.process.wait()
        exits = [child.process.returncode for child in children]
        seen, closed = await _wait_for_closes(server.child.log_path, warm_seen + registered)
        seen, closed = seen - warm_seen, closed - warm_closed
        after_close = server.memory()
    finally:
        with trio.CancelScope(shield=True):
            for child in children:
                await child.close()
            await server.child.close(terminate=True)
    failures: dict[str, int] = {}
    for message in ready:
        for reason, n in message.get("failures", {}).items():
            failures[reason] = failures.get(reason, 0) + int(n)
    memory = verdict(before["VmRSS"], after["VmRSS"], registered)
    complete = registered == params.count and not _sum(results, "lost")
    return {
        "bench": "sessions",
        "params": params.as_dict(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "registered": registered,
        "relay_registered": relay_registered,
        "failed": params.count - registered,
        "attempts": int(_sum(ready, "attempts")),
        "failures": failures,
        "setup_seconds": setup_wall,
        "sessions_per_s": registered / setup_wall if setup_wall else math.nan,
        "setup_p50_ms": _worst(ready, "setup_p50_ms"),
        "setup_p99_ms": _worst(ready, "setup_p99_ms"),
        "relay_cpu_setup_s": setup_cpu,
        "relay_cpu_ms_per_session": 1000 * setup_cpu / registered if registered else math.nan,
        "relay_cpu_hold_s": hold_cpu,
        "relay_cores_idle": hold_cpu / params.hold if params.hold else math.nan,
        "workers_cpu_s": _sum(results, "cpu"),
        "lost": int(_sum(results, "lost")),
        "heartbeats_sent": int(_sum(results, "heartbeats_sent")),
        "heartbeat_acks": int(_sum(results, "heartbeat_acks")),
        "worker_exit_codes": exits,
        "relay_sessions_seen": seen,
        "relay_sessions_closed": closed,
        "relay_sessions_open_after_close": seen - closed,
        "rss_at_start": at_start["VmRSS"],
        "rss_peak": after_close.get("VmHWM", 0),
        "rss_after_close": after_close["VmRSS"],
        **memory,
        "memory_passed": memory["passed"],
        "complete": complete,
        "passed": bool(memory["passed"] and complete),
    }


def run_sessions(params: SessionsParams) -> dict[str, Any]:
    """Run the benchmark and return its report (see :func:`format_report`).

    Raises :class:`BenchError` when a setting is unusable or a process fails or stalls.
    """
    params.check()
    with tempfile.TemporaryDirectory(prefix="relay-bench-sessions-") as tmp:
        report: dict[str, Any] = trio.run(measure, params, Path(tmp))
    return report


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report."""
    p = report["params"]
    failures = ", ".join(f"{k}: {v}" for k, v in report["failures"].items()) or "none"
    exits = report["worker_exit_codes"]
    clean = all(code == 0 for code in exits)
    lines = [
        f"relay bench sessions: {p['count']} idle registered sessions from {p['workers']} "
        f"worker process(es), {p['concurrency']} handshakes at a time each, {p['per_lan']} "
        f"per LAN; held {p['hold']:g} s",
        f"{report['cpus']} CPU(s); load average before the run {report['load_average_before']:.2f}",
        "",
        f"  registered               {report['registered']} of {p['count']} "
        f"(relay log: {report['relay_registered']}); {report['attempts']} attempts, "
        f"failures: {failures}",
        f"  set-up                   {report['setup_seconds']:.1f} s, "
        f"{report['sessions_per_s']:.1f} sessions/s; per session p50 "
        f"{report['setup_p50_ms']:.0f} ms, p99 {report['setup_p99_ms']:.0f} ms",
        f"  relay CPU                {report['relay_cpu_ms_per_session']:.1f} ms per session "
        f"set up; {report['relay_cores_idle']:.3f} cores while idle",
        f"  lost while held          {report['lost']}; heartbeats sent "
        f"{report['heartbeats_sent']}, acknowledged {report['heartbeat_acks']}",
        "",
        f"  relay RSS at start       {_mb(report['rss_at_start'])}",
        f"  relay RSS before         {_mb(report['rss_before'])} (after one warm-up session)",
        f"  relay RSS with sessions  {_mb(report['rss_after'])}",
        f"  delta                    {_mb(report['rss_delta'])}, "
        f"{report['kib_per_session']:.1f} KiB per session",
        f"  projected at 1000        {_mb(report['projected_rss_at_1000'])} "
        f"(target ≤ {_mb(report['target_rss_at_1000'])}; limit for {report['registered']}: "
        f"{_mb(report['rss_limit'])})",
        f"  relay RSS after close    {_mb(report['rss_after_close'])} "
        f"(peak {_mb(report['rss_peak'])})",
        f"  after close              relay log: {report['relay_sessions_closed']} of "
        f"{report['relay_sessions_seen']} sessions closed; workers "
        + ("exited cleanly" if clean else f"exit codes {exits}"),
        "",
        f"Verdict: {'PASS' if report['passed'] else 'FAIL'}: memory "
        f"{'PASS' if report['memory_passed'] else 'FAIL'} (1000 idle registered sessions "
        f"≤ 200 MB RSS), sessions {'PASS' if report['complete'] else 'FAIL'} (all "
        "registered, none lost while held)",
    ]
    return "\n".join(lines)
