"""``relay bench``: the relay against aioquic's own asyncio echo server, in one run.

Everything runs on 127.0.0.1, each piece in its own OS process: the relay (``python -m relay
serve``), the baseline (:mod:`relay.bench.echo_baseline`) and every client
(:mod:`relay.bench.worker`). The phases, one after another:

1. relay throughput: ``pairs`` pairs of workers, each pair on its own path (its own LAN), so
   the flooding hub forwards each frame to exactly one receiver; the sender floods (or paces
   at ``rate``) for ``seconds``, the receiver counts.
2. relay round trip: one ping/pong pair, one frame in flight.
3. baseline throughput: ``pairs`` workers each flood the echo server and count the echoes.
4. baseline round trip: one ping worker against the echo server.

Server CPU is read from ``/proc/<pid>/stat`` around each throughput phase. The relay forwards
client → relay → client, one receive and one send per frame at the server, exactly like an
echo, so frames/s, CPU per frame and round-trip times compare like for like.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import trio

import relay
from relay.bench.worker import MAX_SIZE, MIN_SIZE
from relay.client import random_mac
from relay.tls import generate_self_signed, write_identity
from relay.wire.codec import CHUNK_THRESHOLD, MAX_CHUNK_PAYLOAD

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0
"""Seconds a server or worker may take to start (import, certificate, handshake)."""
RESULT_SLACK = 15.0
"""Seconds beyond the expected duration before a phase is declared stuck."""

_HASH_LINE = re.compile(r"Certificate SHA-256 Hash \(hex\): ([0-9a-fA-F]{64})")
_LISTEN_LINE = re.compile(r"Listening on https://([^/]+)/")
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark process failed or stalled."""


def _python() -> str:
    return sys.executable


def _env() -> dict[str, str]:
    """The child environment: our ``relay`` package importable whatever the cwd."""
    env = dict(os.environ)
    root = str(Path(relay.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # fields[0] is the state (field 3): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """A subprocess with line-oriented stdin/stdout and stderr in a log file."""

    def __init__(self, name: str, process: trio.Process, log_path: Path, log: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self._log = log
        self._buffer = bytearray()

    @classmethod
    async def start(cls, name: str, command: list[str], workdir: Path) -> Child:
        log_path = workdir / f"{name}.log"
        log = _open_log(log_path)
        try:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=workdir,
                env=_env(),
            )
        except BaseException:
            log.close()
            raise
        return cls(name, process, log_path, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self, what: str) -> BenchError:
        code = self.process.returncode
        status = "" if code is None else f" (exit status {code})"
        tail = _tail(self.log_path)
        return BenchError(
            f"{self.name}: {what}{status}" + (f"; its stderr ends:\n{tail}" if tail else "")
        )

    async def readline(self) -> str:
        """The next stdout line; BenchError at end of file."""
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            index = self._buffer.find(b"\n")
            if index >= 0:
                line = bytes(self._buffer[: index + 1])
                del self._buffer[: index + 1]
                return line.decode("utf-8", "replace").rstrip("\r\n")
            data = await stdout.receive_some(65536)
            if not data:
                await self._reap(1.0)
                raise self.failure("exited early")
            self._buffer += data

    async def read_event(self, event: str) -> dict[str, Any]:
        """The next JSON line, which must be ``event``."""
        line = await self.readline()
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise self.failure(f"printed {line[:200]!r} instead of JSON") from None
        if not isinstance(message, dict) or message.get("event") != event:
            raise self.failure(f"sent {line[:200]!r}, expected a {event!r} event")
        return message

    async def send(self, command: str) -> None:
        stdin = self.process.stdin
        if stdin is None:
            return
        try:
            await stdin.send_all(command.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _reap(self, grace: float) -> None:
        with trio.move_on_after(grace):
            await self.process.wait()

    async def close(self, *, terminate: bool = False, grace: float = 3.0) -> None:
        """Ask the child to end (EOF on stdin, or SIGTERM), then kill it; always reap it."""
        with trio.CancelScope(shield=True):
            try:
                if self.process.stdin is not None:
                    await self.process.stdin.aclose()
                if terminate and self.process.returncode is None:
                    self.process.send_signal(signal.SIGTERM)
                await self._reap(grace)
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()
            finally:
                if self.process.stdout is not None:
                    await self.process.stdout.aclose()
                self._log.close()


@dataclass
class Server:
    """A running relay or echo server."""

    child: Child
    url: str
    cert_hash: str

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu(self) -> float:
        try:
            return process_cpu(self.child.pid)
        except OSError:
            raise self.child.failure("is gone") from None


async def start_server(name: str, command: list[str], workdir: Path) -> Server:
    """Start a server and read its stdout until it says where it listens."""
    child = await Child.start(name, command, workdir)
    try:
        cert_hash = None
        with trio.move_on_after(STARTUP_TIMEOUT):
            while True:
                line = await child.readline()
                if match := _HASH_LINE.search(line):
                    cert_hash = match.group(1)
                elif match := _LISTEN_LINE.search(line):
                    if cert_hash is None:
                        raise child.failure("listens but printed no certificate hash")
                    return Server(child, f"https://{match.group(1)}", cert_hash)
        raise child.failure(f"not listening after {STARTUP_TIMEOUT:g} s")
    except BaseException:
        await child.close(terminate=True)
        raise


@dataclass
class WorkerSpec:
    """One worker process to start."""

    name: str
    role: str
    path: str
    mode: str = "relay"
    pair: int = 0
    mac: bytes = field(default_factory=random_mac)
    peer_mac: bytes = b"\xff" * 6
    primary: bool = True
    """Reports on its own; the others (sinks, pongs) report after ``stop``."""


@dataclass(frozen=True)
class Params:
    pairs: int
    seconds: float
    size: int
    rate: int | None
    pings: int
    rounds: int = 1


@dataclass
class PhaseResult:
    results: dict[str, dict[str, Any]]
    wall: float
    server_cpu: float


async def run_phase(
    server: Server, specs: list[WorkerSpec], params: Params, workdir: Path
) -> PhaseResult:
    """Start the workers, wait until all are ready, ``go``, collect their results."""
    children: list[tuple[WorkerSpec, Child]] = []
    try:
        for spec in specs:
            command = [
                _python(),
                "-m",
                "relay.bench.worker",
                "--url",
                server.url + spec.path,
                "--cert-hash",
                server.cert_hash,
                "--mode",
                spec.mode,
                "--role",
                spec.role,
                "--seconds",
                repr(params.seconds),
                "--size",
                str(params.size),
                "--rate",
                str(params.rate or 0),
                "--count",
                str(params.pings),
                "--pair",
                str(spec.pair),
                "--mac",
                spec.mac.hex(),
                "--peer-mac",
                spec.peer_mac.hex(),
            ]
            children.append((spec, await Child.start(spec.name, command, workdir)))
        with _stuck_after(STARTUP_TIMEOUT, "not ready", children):
            for _, child in children:
                await child.read_event("ready")
        results: dict[str, dict[str, Any]] = {}
        cpu_before, wall_before = server.cpu(), time.monotonic()
        for _, child in children:
            await child.send("go")
        limit = params.seconds + RESULT_SLACK
        with _stuck_after(limit, "no result", children):
            for spec, child in children:
                if spec.primary:
                    results[spec.name] = await child.read_event("result")
            for _, child in children:
                await child.send("stop")
            for spec, child in children:
                if not spec.primary:
                    results[spec.name] = await child.read_event("result")
        if server.child.process.returncode is not None:
            raise server.child.failure("died during the phase")
        server_cpu, wall = server.cpu() - cpu_before, time.monotonic() - wall_before
        return PhaseResult(results, wall, server_cpu)
    finally:
        with trio.CancelScope(shield=True):
            for _, child in children:
                await child.close()


@contextmanager
def _stuck_after(
    seconds: float, what: str, children: list[tuple[WorkerSpec, Child]]
) -> Iterator[None]:
    """Like ``trio.fail_after``, but the error names the workers and shows their stderr."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        tails = "\n".join(f"--- {child.name}:\n{_tail(child.log_path, 5)}" for _, child in children)
        raise BenchError(f"{what} from the workers after {seconds:g} s; their stderr:\n{tails}")


def _sum(results: list[dict[str, Any]], key: str) -> float:
    return sum(float(r.get(key, 0)) for r in results)


def throughput_figures(phase: PhaseResult, size: int) -> dict[str, Any]:
    """Frames/s, loss and CPU per frame from a throughput phase."""
    values = list(phase.results.values())
    senders = [r for r in values if "frames_sent" in r]
    receivers = [r for r in values if "frames_received" in r]
    sent = int(_sum(senders, "frames_sent"))
    received = int(_sum(receivers, "frames_received"))
    queue_drops = int(
        _sum(senders, "sender_queue_drops")
        + _sum(senders, "sender_udp_drops")
        + _sum(senders, "unsent_at_end")
    )
    per_frame = 1 if size <= CHUNK_THRESHOLD else math.ceil(size / MAX_CHUNK_PAYLOAD)
    left_sender = max(0, sent - math.ceil(queue_drops / per_frame))
    duration = max(float(r["send_duration"]) for r in senders) if senders else math.nan
    delays = [d for r in receivers for d in r.get("delays", [])]
    client_cpu = sum(float(r.get("cpu", 0.0)) for r in values)
    return {
        "frames_sent": sent,
        "frames_received": received,
        "datagrams_per_frame": per_frame,
        "sender_queue_drops": queue_drops,
        "sender_stalls": int(_sum(senders, "stalls")),
        "offered_fps": sent / duration,
        "frames_per_s": received / duration,
        "mbit_per_s": received * size * 8 / duration / 1e6,
        "loss_pct": 100.0 * (1 - received / left_sender) if left_sender else math.nan,
        "send_duration": duration,
        "phase_wall": phase.wall,
        "server_cpu_s": phase.server_cpu,
        "server_cpu_us_per_frame": 1e6 * phase.server_cpu / received if received else math.nan,
        "server_cpu_us_per_frame_sent": (
            1e6 * phase.server_cpu / left_sender if left_sender else math.nan
        ),
        "server_cores": phase.server_cpu / phase.wall,
        "clients_cores": client_cpu / phase.wall,
        "one_way_p50_ms": 1000 * percentile(delays, 0.50),
        "one_way_p99_ms": 1000 * percentile(delays, 0.99),
        "receiver_drops": {k: v for r in receivers for k, v in r.get("drops", {}).items() if v},
    }


def rtt_figures(phase: PhaseResult) -> dict[str, Any]:
    """Round-trip times; through the relay also the one-way delay ping → relay → pong."""
    pinger = next(r for r in phase.results.values() if "rtts" in r)
    rtts: list[float] = pinger["rtts"]
    figures = {
        "pings": pinger["pings"],
        "lost": pinger["lost"],
        "p50_ms": 1000 * percentile(rtts, 0.50),
        "p99_ms": 1000 * percentile(rtts, 0.99),
        "max_ms": 1000 * max(rtts) if rtts else math.nan,
    }
    ponger = next((r for r in phase.results.values() if r.get("role") == "pong"), None)
    if ponger is not None:
        delays: list[float] = ponger.get("delays", [])
        figures["one_way_p50_ms"] = 1000 * percentile(delays, 0.50)
        figures["one_way_p99_ms"] = 1000 * percentile(delays, 0.99)
    return figures


def relay_command(workdir: Path) -> list[str]:
    """How the relay under test is started (a function, so investigations can wrap it)."""
    return [
        _python(),
        "-m",
        "relay",
        "serve",
        "--bind",
        HOST,
        "--port",
        "0",
        "--log-level",
        "warning",
        "--data-dir",
        str(workdir / "relay-data"),
    ]


def _figures(flood: PhaseResult, rtt: PhaseResult, size: int) -> dict[str, Any]:
    return {
        "throughput": throughput_figures(flood, size),
        "rtt": rtt_figures(rtt),
        "workers": {**flood.results, **{k: _without_samples(v) for k, v in rtt.results.items()}},
    }


async def bench_relay(params: Params, workdir: Path) -> dict[str, Any]:
    server = await start_server("relay", relay_command(workdir), workdir)
    try:
        specs: list[WorkerSpec] = []
        for pair in range(params.pairs):
            path = f"/bench/{pair}"
            source = WorkerSpec(f"source{pair}", "source", path, pair=pair)
            sink = WorkerSpec(f"sink{pair}", "sink", path, pair=pair, primary=False)
            source.peer_mac, sink.peer_mac = sink.mac, source.mac
            specs += [sink, source]
        flood = await run_phase(server, specs, params, workdir)
        ping = WorkerSpec("ping", "ping", "/bench/ping")
        pong = WorkerSpec("pong", "pong", "/bench/ping", primary=False, peer_mac=ping.mac)
        ping.peer_mac = pong.mac
        rtt = await run_phase(server, [pong, ping], params, workdir)
    finally:
        await server.child.close(terminate=True)
    return _figures(flood, rtt, params.size)


async def bench_baseline(params: Params, workdir: Path) -> dict[str, Any]:
    identity = generate_self_signed()
    cert, key = write_identity(identity, workdir / "echo-cert")
    command = [
        _python(),
        "-m",
        "relay.bench.echo_baseline",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--host",
        HOST,
        "--port",
        "0",
    ]
    server = await start_server("echo", command, workdir)
    if server.cert_hash != identity.hash_hex:
        await server.child.close(terminate=True)
        raise BenchError("the echo server reports another certificate than it was given")
    try:
        specs = [
            WorkerSpec(f"echo-flood{i}", "echo-flood", f"/bench/{i}", mode="echo", pair=i)
            for i in range(params.pairs)
        ]
        flood = await run_phase(server, specs, params, workdir)
        ping = WorkerSpec("echo-ping", "ping", "/bench/ping", mode="echo")
        rtt = await run_phase(server, [ping], params, workdir)
    finally:
        await server.child.close(terminate=True)
    return _figures(flood, rtt, params.size)


def _without_samples(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("rtts", "delays")}


async def bench(params: Params, workdir: Path) -> dict[str, Any]:
    """Run ``rounds`` rounds, relay and baseline alternating; report the median round.

    A shared, noisy 2-core machine swings single runs by 2x; alternating the two servers
    and taking the median round by CPU per frame makes the ratios worth reading.
    """
    rounds = [await bench_round(params, workdir / f"round{i}") for i in range(params.rounds)]
    ordered = sorted(rounds, key=lambda r: float(r["ratios"]["cpu_per_frame"]))
    report = ordered[len(ordered) // 2]
    report["rounds"] = [r["ratios"] for r in rounds]
    return report


async def bench_round(params: Params, workdir: Path) -> dict[str, Any]:
    """One relay measurement and one baseline measurement."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    budget = 4 * (params.seconds + RESULT_SLACK) + 6 * STARTUP_TIMEOUT
    with trio.fail_after(budget):
        relay_result = await bench_relay(params, workdir)
        baseline_result = await bench_baseline(params, workdir)
    relay_tp, base_tp = relay_result["throughput"], baseline_result["throughput"]
    relay_rtt, base_rtt = relay_result["rtt"], baseline_result["rtt"]
    for result in (relay_result, baseline_result):
        for worker in result["workers"].values():
            worker.pop("delays", None)
    return {
        "params": {
            "pairs": params.pairs,
            "seconds": params.seconds,
            "size": params.size,
            "rate": params.rate,
            "pings": params.pings,
            "rounds": params.rounds,
        },
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "relay": relay_result,
        "baseline": baseline_result,
        "ratios": {
            "frames_per_s": _ratio(relay_tp["frames_per_s"], base_tp["frames_per_s"]),
            "cpu_per_frame": _ratio(
                relay_tp["server_cpu_us_per_frame"], base_tp["server_cpu_us_per_frame"]
            ),
            "added_rtt_p50_ms": relay_rtt["p50_ms"] - base_rtt["p50_ms"],
            "added_rtt_p99_ms": relay_rtt["p99_ms"] - base_rtt["p99_ms"],
            # One pass through each server: client -> relay -> client against
            # client -> echo -> client.
            "added_per_pass_p50_ms": relay_rtt["one_way_p50_ms"] - base_rtt["p50_ms"],
            "added_per_pass_p99_ms": relay_rtt["one_way_p99_ms"] - base_rtt["p99_ms"],
        },
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _ms_pair(p50: float, p99: float) -> str:
    return f"{p50:.2f} / {p99:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table."""
    p = report["params"]
    r, b = report["relay"], report["baseline"]
    rt, bt, rr, br = r["throughput"], b["throughput"], r["rtt"], b["rtt"]
    ratios = report["ratios"]
    chunks = rt["datagrams_per_frame"]
    datagrams = (
        "1 datagram each"
        if chunks == 1
        else f"{chunks} datagrams each: frames above {CHUNK_THRESHOLD} bytes are chunked"
    )
    pacing = f"paced at {p['rate']} frames/s per sender" if p["rate"] else "unpaced"
    lines = [
        f"relay bench: {p['pairs']} pair(s), {p['seconds']:g} s, {p['size']}-byte frames "
        f"({datagrams}), {pacing}",
        f"{report['cpus']} CPU(s); load average before the run {report['load_average_before']:.2f}"
        " (other processes' load skews every figure)",
        "",
    ]

    def row(label: str, relay_value: str = "", base_value: str = "", extra: str = "") -> None:
        lines.append(f"{label:34}{relay_value:>18}{base_value:>18}{extra:>12}")

    row("", "relay", "baseline echo", "relay/echo")
    row("Throughput, one sender per pair")
    row(
        "  frames/s delivered",
        f"{rt['frames_per_s']:,.0f}",
        f"{bt['frames_per_s']:,.0f}",
        f"x{ratios['frames_per_s']:.2f}",
    )
    row("  Mbit/s of frames delivered", f"{rt['mbit_per_s']:.1f}", f"{bt['mbit_per_s']:.1f}")
    row(
        "  frames/s offered by the senders",
        f"{rt['offered_fps']:,.0f}",
        f"{bt['offered_fps']:,.0f}",
    )
    row("  loss", f"{rt['loss_pct']:.2f} %", f"{bt['loss_pct']:.2f} %")
    row("  sender-side queue drops", f"{rt['sender_queue_drops']}", f"{bt['sender_queue_drops']}")
    row(
        "  delay under load p50 / p99 ms",
        _ms_pair(rt["one_way_p50_ms"], rt["one_way_p99_ms"]),
        _ms_pair(bt["one_way_p50_ms"], bt["one_way_p99_ms"]),
    )
    row(
        "  server CPU µs per frame delivered",
        f"{rt['server_cpu_us_per_frame']:.1f}",
        f"{bt['server_cpu_us_per_frame']:.1f}",
        f"x{ratios['cpu_per_frame']:.2f}",
    )
    row(
        "    per frame sent (incl. lost)",
        f"{rt['server_cpu_us_per_frame_sent']:.1f}",
        f"{bt['server_cpu_us_per_frame_sent']:.1f}",
    )
    row("  server CPU, cores busy", f"{rt['server_cores']:.2f}", f"{bt['server_cores']:.2f}")
    row(
        "  client processes, cores busy", f"{rt['clients_cores']:.2f}", f"{bt['clients_cores']:.2f}"
    )
    row("Latency, one frame in flight", "", "", "added ms")
    row(
        "  one pass p50 / p99 ms",
        _ms_pair(rr["one_way_p50_ms"], rr["one_way_p99_ms"]),
        _ms_pair(br["p50_ms"], br["p99_ms"]),
        f"{ratios['added_per_pass_p50_ms']:+.3f}",
    )
    row(
        "  round trip p50 / p99 ms",
        _ms_pair(rr["p50_ms"], rr["p99_ms"]),
        _ms_pair(br["p50_ms"], br["p99_ms"]),
        f"{ratios['added_rtt_p50_ms']:+.3f}",
    )
    row("  pings (lost)", f"{rr['pings']} ({rr['lost']})", f"{br['pings']} ({br['lost']})")
    lines += [
        "",
        "Like for like: the relay forwards client -> relay -> client, one receive and one",
        "send per frame at the server, as the echo does (client -> echo -> client).",
        "* Loss counts frames that left the senders' own queues; sender-side drops are the",
        "  clients', not the servers'. Delay under load is sender -> receiver (for the echo,",
        "  the full round trip, as sender and receiver are one process).",
        "* One pass: relay A -> relay -> B (one way) against the echo's A -> echo -> A round",
        "  trip. Round trip: the relay's A -> relay -> B -> relay -> A is two passes plus",
        "  B's turnaround, against one echo pass; its added figure is what the brief asks.",
    ]
    rounds = report.get("rounds", [])
    if len(rounds) > 1:
        lines.append(
            f"Rounds ({len(rounds)}, relay and echo alternating; the median by CPU per frame is "
            "shown above):"
        )
        for i, ratio in enumerate(rounds, 1):
            lines.append(
                f"  round {i}: frames/s x{ratio['frames_per_s']:.2f}, CPU per frame "
                f"x{ratio['cpu_per_frame']:.2f}, added one-pass p50 "
                f"{ratio['added_per_pass_p50_ms']:+.3f} ms"
            )
    if rt["receiver_drops"] or bt["receiver_drops"]:
        lines.append(
            f"Receiver-side drops: relay {rt['receiver_drops']}, baseline {bt['receiver_drops']}"
        )
    cpus = report["cpus"] or 0
    for name, figures in (("relay", rt), ("baseline", bt)):
        if cpus and figures["server_cores"] + figures["clients_cores"] > 0.9 * cpus:
            lines.append(
                f"Note: CPUs saturated in the {name} throughput phase (clients compete with "
                "the server)."
            )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_bench(
    *,
    pairs: int,
    seconds: float,
    size: int,
    rate: int | None,
    json_out: Path | None,
    pings: int = 2000,
    rounds: int = 1,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print the table to ``out`` (stdout), optionally write JSON.

    ``rate`` is frames/s per sender (None: as fast as each sender's queue allows).
    Raises :class:`BenchError` when a process fails or stalls.
    """
    if pairs < 1:
        raise BenchError("pairs must be at least 1")
    if not (math.isfinite(seconds) and seconds > 0):
        raise BenchError("seconds must be positive")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise BenchError(f"size must be within {MIN_SIZE}-{MAX_SIZE} bytes")
    if rate is not None and rate <= 0:
        raise BenchError("rate must be positive")
    if pings < 1:
        raise BenchError("pings must be at least 1")
    if rounds < 1:
        raise BenchError("rounds must be at least 1")
    params = Params(pairs=pairs, seconds=seconds, size=size, rate=rate, pings=pings, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        try:
            report: dict[str, Any] = trio.run(bench, params, Path(tmp))
        except trio.TooSlowError:
            raise BenchError("the benchmark did not finish in time") from None
    out = out or sys.stdout
    print(format_report(report), file=out, flush=True)
    if json_out is not None:
        json_out.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relay bench",
        description="Benchmark the relay against aioquic's asyncio echo server (127.0.0.1).",
    )
    parser.add_argument("--pairs", type=int, default=2, help="sender/receiver pairs (default 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="flood duration (default 5)")
    parser.add_argument(
        "--size",
        type=int,
        default=1000,
        help=f"frame bytes, {MIN_SIZE}-{MAX_SIZE}; above {CHUNK_THRESHOLD} "
        "frames are chunked (default 1000)",
    )
    parser.add_argument(
        "--rate", type=int, default=None, help="frames/s per sender (default: as fast as possible)"
    )
    parser.add_argument(
        "--pings",
        type=int,
        default=2000,
        help="round trips measured, for at most --seconds (default 2000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="relay/baseline rounds, alternating; the median round is shown (default 3)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        dest="json_out",
        help="also write the full results as JSON here",
    )
    args = parser.parse_args(argv)
    try:
        run_bench(
            pairs=args.pairs,
            seconds=args.seconds,
            size=args.size,
            rate=args.rate,
            json_out=args.json_out,
            pings=args.pings,
            rounds=args.rounds,
        )
    except BenchError as exc:
        print(f"relay bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
