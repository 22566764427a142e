"""``relay bench switch``: the relay's switching against aioquic's own asyncio echo server.

Everything runs on 127.0.0.1, each piece in its own OS process: the relay (``python -m relay
serve``), the baseline (:mod:`relay.bench.echo_baseline`) and every client
(:mod:`relay.bench.worker`). One round is four phases, one after another:

1. relay throughput: ``pairs`` pairs of workers, each pair on its own LAN (``/lan/bench<N>``);
   the sender addresses the receiver's MAC, which the learning switch knows from its
   registration, so each frame goes to exactly one port. The sender floods (or paces at
   ``rate``) for ``seconds``, the receiver counts.
2. relay round trip: one ping/pong pair on its own LAN, one frame in flight.
3. baseline throughput: ``pairs`` workers each flood the echo server and count the echoes.
4. baseline round trip: one ping worker against the echo server.

Server CPU is read from ``/proc/<pid>/stat`` around each throughput phase. The relay forwards
client → relay → client, one receive and one send per frame at the server, exactly like an
echo, so frames/s, CPU per frame and round-trip times compare like for like.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from relay.bench.procs import (
    HOST,
    STARTUP_TIMEOUT,
    BenchError,
    Child,
    Server,
    python,
    start_relay,
    start_server,
    tail,
)
from relay.bench.switch_report import figures, round_summary, summarise_rounds
from relay.bench.worker import MAX_SIZE, MIN_SIZE
from relay.client import random_mac
from relay.tls import generate_self_signed, write_identity

RESULT_SLACK = 15.0
"""Seconds beyond the expected duration before a phase is declared stuck."""
BROADCAST = b"\xff" * 6


def lan_path(name: str) -> str:
    """A named LAN of its own for one group of workers."""
    return f"/lan/bench{name}"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker process to start."""

    name: str
    role: str
    path: str
    mode: str = "relay"
    pair: int = 0
    mac: bytes = field(default_factory=random_mac)
    peer_mac: bytes = BROADCAST
    primary: bool = True
    """Reports on its own; the others (sinks, pongs) report after ``stop``."""


@dataclass(frozen=True, slots=True)
class SwitchParams:
    pairs: int = 2
    seconds: float = 5.0
    size: int = 1000
    rate: int | None = None
    """Frames/s per sender; None: as fast as each sender's queue allows."""
    pings: int = 2000
    rounds: int = 3

    def check(self) -> None:
        """BenchError for a setting that cannot run."""
        if self.pairs < 1:
            raise BenchError("pairs must be at least 1")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise BenchError("seconds must be positive")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise BenchError(f"size must be within {MIN_SIZE}-{MAX_SIZE} bytes")
        if self.rate is not None and self.rate <= 0:
            raise BenchError("rate must be positive")
        if self.pings < 1:
            raise BenchError("pings must be at least 1")
        if self.rounds < 1:
            raise BenchError("rounds must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "seconds": self.seconds,
            "size": self.size,
            "rate": self.rate,
            "pings": self.pings,
            "rounds": self.rounds,
        }


@dataclass(frozen=True, slots=True)
class PhaseResult:
    results: dict[str, dict[str, Any]]
    wall: float
    server_cpu: float


def _worker_command(
    server: Server, spec: WorkerSpec, params: SwitchParams, peer_ip: str | None
) -> list[str]:
    return [
        python(),
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
        *(["--peer-ip", peer_ip] if peer_ip else []),
    ]


@contextmanager
def _stuck_after(seconds: float, what: str, children: list[Child]) -> Iterator[None]:
    """Like ``trio.fail_after``, but the error names the workers and shows their stderr."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        tails = "\n".join(f"--- {child.name}:\n{tail(child.log_path, 5)}" for child in children)
        raise BenchError(f"{what} from the workers after {seconds:g} s; their stderr:\n{tails}")


async def run_phase(
    server: Server, specs: list[WorkerSpec], params: SwitchParams, workdir: Path
) -> PhaseResult:
    """Start the workers, wait until all are ready, ``go``, collect their results.

    Receivers (sinks, pongs) start first: once they are registered the learning switch knows
    their MACs, so no frame is flooded as "unknown destination", and their ready messages
    carry the addresses the senders must put in their frames.
    """
    children: list[Child] = []
    try:
        peer_ips: dict[bytes, str] = {}
        for wave in ([s for s in specs if not s.primary], [s for s in specs if s.primary]):
            started = []
            for spec in wave:
                command = _worker_command(server, spec, params, peer_ips.get(spec.peer_mac))
                started.append(await Child.start(spec.name, command, workdir))
            children += started
            with _stuck_after(STARTUP_TIMEOUT, "not ready", started):
                for spec, child in zip(wave, started, strict=True):
                    ready = await child.read_event("ready")
                    if ready.get("ip"):
                        peer_ips[spec.mac] = str(ready["ip"])
        ordered = [s for s in specs if not s.primary] + [s for s in specs if s.primary]
        results: dict[str, dict[str, Any]] = {}
        cpu_before, wall_before = server.cpu(), time.monotonic()
        for child in children:
            await child.send("go")
        with _stuck_after(params.seconds + RESULT_SLACK, "no result", children):
            for spec, child in zip(ordered, children, strict=True):
                if spec.primary:
                    results[spec.name] = await child.read_event("result")
            for child in children:
                await child.send("stop")
            for spec, child in zip(ordered, children, strict=True):
                if not spec.primary:
                    results[spec.name] = await child.read_event("result")
        server.check_alive("during the phase")
        server_cpu, wall = server.cpu() - cpu_before, time.monotonic() - wall_before
        return PhaseResult(results, wall, server_cpu)
    finally:
        with trio.CancelScope(shield=True):
            for child in children:
                await child.close()


def _pair_specs(pairs: int) -> list[WorkerSpec]:
    specs: list[WorkerSpec] = []
    for pair in range(pairs):
        path = lan_path(str(pair))
        source_mac, sink_mac = random_mac(), random_mac()
        specs.append(
            WorkerSpec(
                f"sink{pair}",
                "sink",
                path,
                pair=pair,
                mac=sink_mac,
                peer_mac=source_mac,
                primary=False,
            )
        )
        specs.append(
            WorkerSpec(
                f"source{pair}", "source", path, pair=pair, mac=source_mac, peer_mac=sink_mac
            )
        )
    return specs


async def bench_relay(params: SwitchParams, workdir: Path) -> dict[str, Any]:
    server = await start_relay(workdir)
    try:
        flood = await run_phase(server, _pair_specs(params.pairs), params, workdir)
        ping_mac, pong_mac = random_mac(), random_mac()
        path = lan_path("ping")
        pong = WorkerSpec("pong", "pong", path, mac=pong_mac, peer_mac=ping_mac, primary=False)
        ping = WorkerSpec("ping", "ping", path, mac=ping_mac, peer_mac=pong_mac)
        rtt = await run_phase(server, [pong, ping], params, workdir)
    finally:
        await server.child.close(terminate=True)
    return figures(flood.results, flood.wall, flood.server_cpu, rtt.results, params.size)


async def bench_baseline(params: SwitchParams, workdir: Path) -> dict[str, Any]:
    identity = generate_self_signed()
    cert, key = write_identity(identity, workdir / "echo-cert")
    command = [
        python(),
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
            WorkerSpec(f"echo-flood{i}", "echo-flood", lan_path(str(i)), mode="echo", pair=i)
            for i in range(params.pairs)
        ]
        flood = await run_phase(server, specs, params, workdir)
        ping = WorkerSpec("echo-ping", "ping", lan_path("ping"), mode="echo")
        rtt = await run_phase(server, [ping], params, workdir)
    finally:
        await server.child.close(terminate=True)
    return figures(flood.results, flood.wall, flood.server_cpu, rtt.results, params.size)


async def bench_round(params: SwitchParams, workdir: Path) -> dict[str, Any]:
    """One relay measurement, then one baseline measurement."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    budget = 4 * (params.seconds + RESULT_SLACK) + 6 * STARTUP_TIMEOUT
    with trio.fail_after(budget):
        relay_result = await bench_relay(params, workdir)
        baseline_result = await bench_baseline(params, workdir)
    return {
        "load_average_before": load_before,
        "relay": relay_result,
        "baseline": baseline_result,
        "summary": round_summary(relay_result, baseline_result),
    }


async def bench(params: SwitchParams, workdir: Path) -> dict[str, Any]:
    """Run ``rounds`` rounds, relay and baseline alternating.

    A shared, noisy 2-core machine swings single runs by 2x: alternating the two servers and
    reading medians over the rounds makes the ratios worth reading. The detailed figures are
    those of the median round by CPU per frame.
    """
    rounds = [await bench_round(params, workdir / f"round{i}") for i in range(params.rounds)]
    ordered = sorted(rounds, key=lambda r: float(r["summary"]["cpu_per_frame_ratio"]))
    shown = ordered[len(ordered) // 2]
    return {
        "bench": "switch",
        "params": params.as_dict(),
        "cpus": os.cpu_count(),
        "shown_round": rounds.index(shown) + 1,
        **shown,
        "rounds": [r["summary"] for r in rounds],
        "median": summarise_rounds([r["summary"] for r in rounds]),
    }


def run_switch(params: SwitchParams) -> dict[str, Any]:
    """Run the benchmark and return its report (see :func:`switch_report.format_report`).

    Raises :class:`BenchError` when a setting is unusable or a process fails or stalls.
    """
    params.check()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        try:
            report: dict[str, Any] = trio.run(bench, params, Path(tmp))
        except trio.TooSlowError:
            raise BenchError("the benchmark did not finish in time") from None
    return report
