"""``relay bench nat``: TCP through the relay's NAT against the client-path ceiling and
slirp4netns, with real Linux stacks in network namespaces (needs root).

One run builds the whole topology, measures, and removes it all (namespaces, veths, TAP devices,
processes), on error and Ctrl-C too:

* ``inet``: a namespace at 198.18.0.2, joined to the root namespace (198.18.0.1) by a veth,
  running ``iperf3 --server`` and a stdlib HTTP server with a file of random bytes;
* the relay (``python -m relay serve``, egress opened to 198.18.0.2 only) in the root namespace,
  and ``relay tap`` clients whose TAP devices are moved into VM namespaces, configured by
  busybox udhcpc as a guest would be (10.0.2.x, MTU 936, default route 10.0.2.2);
* ``slirp``: a namespace connected by ``slirp4netns``, the usual user-space NAT, for CPU per GB;
* ``loss``: a VM whose tap client talks to the relay through :mod:`relay.bench.lossy`.

The measurements run one after another: the ceiling (iperf3 VM1 <-> VM2 through the relay's
switch), the NAT (iperf3 both ways and the HTTP download, VM1 <-> inet), slirp4netns (the same
three), and the NAT over the lossy path (iperf3 only, both ways: TCP under loss is slow, and
the HTTP file would take minutes). A stage that cannot be set up, or a relay that dies, marks
its measurements failed; the others are still reported.

Traffic goes only to loopback, 198.18.0.0/24 and the VM namespaces' own 10.0.2.0/24.
Every process is timed out. CPU is read from ``/proc/<pid>/stat`` around each transfer, and the
whole machine's from ``/proc/stat`` (a figure with the machine near 100 % busy is CPU-bound).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from relay.bench import netns
from relay.bench.lossy import LossyForwarder
from relay.bench.nat_report import MEASUREMENTS, ratios, transfer_figures
from relay.bench.netns import (
    GUEST_MTU,
    SLIRP_MTU,
    Resources,
    Vm,
    attach_slirp,
    attach_vm,
    check_host,
    run,
    wait_for_text,
    wait_listening,
)
from relay.bench.procs import (
    HOST,
    STARTUP_TIMEOUT,
    BenchError,
    Server,
    process_cpu,
    python,
    relay_command,
    start_server,
)

INET_HOST, INET_SERVER = "198.18.0.1", "198.18.0.2"
INET_NET = "198.18.0.0/24"
HTTP_PORT = 8080
FILE_NAME = "random.bin"
IPERF_SLACK = 60.0
"""Seconds beyond ``--time`` an iperf3 run may take (connect, slow start, final exchange)."""


@dataclass(frozen=True, slots=True)
class NatParams:
    seconds: int = 10
    http_mb: int = 200
    loss: float = 0.05
    slirp: bool = True
    lossy: bool = True
    seed: int = 1
    slirp_mtu: int = SLIRP_MTU

    def check(self) -> None:
        """BenchError for a setting that cannot run."""
        if not 1 <= self.seconds <= 600:
            raise BenchError("seconds must be within 1-600 (iperf3 takes whole seconds)")
        if not 1 <= self.http_mb <= 4096:
            raise BenchError("http-mb must be within 1-4096")
        if not (math.isfinite(self.loss) and 0 <= self.loss < 1):
            raise BenchError("loss must be within [0, 1)")
        if not 576 <= self.slirp_mtu <= 65520:
            raise BenchError("slirp-mtu must be within 576-65520")

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "http_mb": self.http_mb,
            "loss": self.loss,
            "slirp": self.slirp,
            "lossy": self.lossy,
            "seed": self.seed,
            "slirp_mtu": self.slirp_mtu,
        }

    def http_timeout(self) -> float:
        """Seconds the download may take: at least 4 Mbit/s, so a stall cannot last."""
        return 30.0 + 2.0 * self.http_mb

    def budget(self) -> float:
        """Seconds the whole run may take, every phase at its timeout, plus set-up."""
        return 10 * (self.seconds + IPERF_SLACK) + 2 * self.http_timeout() + 12 * STARTUP_TIMEOUT


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    try:
        return {label: process_cpu(pid) for label, pid in pids.items()}
    except OSError as exc:
        raise BenchError(f"a measured process is gone: {exc}") from None


def machine_ticks() -> tuple[int, int]:
    """Busy and total clock ticks of all CPUs so far (the ``cpu`` line of ``/proc/stat``)."""
    with open("/proc/stat", "rb") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest and guest_nice are within user)
    idle = sum(fields[3:5])
    total = sum(fields[:8])
    return total - idle, total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The machine's busy share of all its CPUs between two :func:`machine_ticks`."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else math.nan


async def _measured(
    pids: dict[str, int], *cmd: str, limit: float
) -> tuple[bytes, bytes, int, float, dict[str, float], float]:
    """Run ``cmd`` to its end; its output, exit status, wall time, each pid's CPU delta and
    the machine's busy share meanwhile."""
    before, ticks, start = _cpu(pids), machine_ticks(), time.monotonic()
    done = await run(*cmd, limit=limit, check=False)
    wall, after = time.monotonic() - start, _cpu(pids)
    busy = busy_share(ticks, machine_ticks())
    cpu = {label: after[label] - before[label] for label in pids}
    return done.stdout, done.stderr, done.returncode, wall, cpu, busy


async def iperf(vm: Vm, server: str, seconds: int, reverse: bool) -> dict[str, Any]:
    """One iperf3 TCP run from ``vm``; receiver-side goodput."""
    command = ["iperf3", "--client", server, "--time", str(seconds), "--json"]
    command += ["--connect-timeout", "5000", *(["--reverse"] if reverse else [])]
    out, err, _, wall, cpu, busy = await _measured(
        vm.pids, "ip", "netns", "exec", vm.ns, *command, limit=seconds + IPERF_SLACK
    )
    try:
        result = json.loads(out)
    except json.JSONDecodeError:
        raise BenchError(f"iperf3 printed no JSON: {err.decode(errors='replace')[-300:]}") from None
    if "error" in result:
        raise BenchError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    found = transfer_figures(
        float(received["bits_per_second"]) / 1e6,
        int(received["bytes"]),
        float(received["seconds"]),
        wall,
        cpu,
        busy,
    )
    found["retransmits"] = result["end"].get("sum_sent", {}).get("retransmits")
    return found


async def http_download(vm: Vm, size: int, digest: str, limit: float) -> dict[str, Any]:
    """curl the file from the inet namespace into sha256sum; curl's own time and size."""
    url = f"http://{INET_SERVER}:{HTTP_PORT}/{FILE_NAME}"
    curl = f"curl -sS --fail --max-time {int(limit)}"
    curl += " -w '%{stderr}%{time_total} %{size_download}\\n'"
    out, err, _, wall, cpu, busy = await _measured(
        vm.pids,
        "ip",
        "netns",
        "exec",
        vm.ns,
        "sh",
        "-c",
        f"{curl} {url} | sha256sum",
        limit=limit + 10,
    )
    lines = err.decode(errors="replace").strip().splitlines()
    try:
        seconds, got = float(lines[-1].split()[0]), int(lines[-1].split()[1])
    except (IndexError, ValueError):
        raise BenchError(f"curl: {' '.join(lines)[-300:] or 'no output'}") from None
    if got != size or out.decode().split()[:1] != [digest]:
        raise BenchError(f"curl got {got} of {size} bytes, or they do not match: {lines[:-1]}")
    found = transfer_figures(size * 8 / max(seconds, 1e-6) / 1e6, size, seconds, wall, cpu, busy)
    found["sha256_ok"] = True
    return found


def write_file(directory: Path, megabytes: int) -> str:
    """``megabytes`` MiB of random bytes in ``directory``; their SHA-256."""
    digest = hashlib.sha256()
    with (directory / FILE_NAME).open("wb") as out:
        for _ in range(megabytes):
            piece = os.urandom(1 << 20)
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


def nat_relay_command(workdir: Path) -> list[str]:
    """The bench's relay, with the inet server the only address its NAT may reach."""
    extra = ["--dns-upstream", "127.0.0.1:9", "--http-port", "0"]
    return [*relay_command(workdir), *extra, "--egress-allow", f"{INET_SERVER}/32"]


async def start_inet(res: Resources, http_mb: int) -> str:
    """The inet namespace, its veth and servers; the served file's SHA-256."""
    if (await run("ip", "-4", "route", "show", INET_NET)).stdout.strip():
        raise BenchError(
            f"{INET_NET} is already routed here (another run? ip route show {INET_NET})"
        )
    inet = await res.netns("inet")
    await res.veth(inet, f"{INET_HOST}/24", f"{INET_SERVER}/24")
    www = res.workdir / "www"
    www.mkdir()
    digest = write_file(www, http_mb)
    iperf3 = await res.start(
        "iperf3-inet", "iperf3", "--server", "--bind", INET_SERVER, "--forceflush", ns=inet
    )
    await wait_for_text(res.workdir / "iperf3-inet.log", "Server listening", iperf3, "iperf3")
    await res.start(
        "http-inet",
        python(),
        "-m",
        "http.server",
        str(HTTP_PORT),
        "--bind",
        INET_SERVER,
        "--directory",
        str(www),
        ns=inet,
    )
    await wait_listening(INET_SERVER, HTTP_PORT, "the HTTP server")
    return digest


STAGES: dict[str, tuple[str, ...]] = {
    "ceiling": ("ceiling_up", "ceiling_down"),
    "nat": ("nat_up", "nat_down", "nat_http"),
    "slirp": ("slirp_up", "slirp_down", "slirp_http"),
    "loss": ("path_up", "path_down", "loss_up", "loss_down"),
}
"""The measurements of each stage, in the order they run (see :data:`MEASUREMENTS`)."""


class Bench:
    """One run: what it built, what it found, what failed."""

    def __init__(self, params: NatParams, res: Resources) -> None:
        self.params, self.res = params, res
        self.found: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.skipped: list[str] = []
        self.relay_died: str | None = None

    def fail(self, names: tuple[str, ...] | list[str], why: str) -> None:
        """Record ``why`` for each of ``names`` that has neither a figure nor an error yet."""
        for name in names:
            if name not in self.found and name not in self.errors:
                self.errors[name] = why

    def _relay_gone(self, relay: Server | None, during: str) -> bool:
        """Whether the relay (if this measurement needs it) has died, now or before."""
        if relay is None:
            return False
        if self.relay_died is None:
            try:
                relay.check_alive(during)
            except BenchError as exc:
                self.relay_died = str(exc)
        return self.relay_died is not None

    def _died_first_line(self) -> str:
        return (self.relay_died or "").splitlines()[0] if self.relay_died else ""

    async def attempt(
        self, name: str, relay: Server | None, measure: Callable[[], Awaitable[dict[str, Any]]]
    ) -> None:
        """Record one measurement or its error; nothing a dying relay carried counts."""
        if self._relay_gone(relay, f"before {name}"):
            self.errors[name] = f"not run: {self._died_first_line()}"
            return
        try:
            found = await measure()
        except BenchError as exc:
            self.errors[name] = str(exc)
            found = None
        if self._relay_gone(relay, f"during {name}"):
            self.errors[name] = f"the relay died: {self.relay_died}"
        elif found is not None:
            self.found[name] = found

    async def stage(
        self, stage: str, relay: Server | None, body: Callable[[], Awaitable[None]]
    ) -> None:
        """Run one stage; if it cannot be set up (or the relay is gone), its measurements
        fail with the reason and the run goes on to the next stage."""
        if self._relay_gone(relay, f"before the {stage} stage"):
            self.fail(STAGES[stage], f"not run: {self._died_first_line()}")
            return
        try:
            await body()
        except BenchError as exc:
            self.fail(STAGES[stage], f"{stage} set-up failed: {exc}")

    async def transfers(self, prefix: str, vm: Vm, server: str, relay: Server | None) -> None:
        seconds = self.params.seconds
        for direction, reverse in (("up", False), ("down", True)):
            await self.attempt(
                f"{prefix}_{direction}", relay, partial(iperf, vm, server, seconds, reverse)
            )

    async def run(self, nursery: trio.Nursery) -> None:
        p, res = self.params, self.res
        digest = await start_inet(res, p.http_mb)
        size = p.http_mb << 20
        relay = await start_server("relay", nat_relay_command(res.workdir), res.workdir)
        res.children.append(relay.child)
        vm1 = await attach_vm(res, "vm1", relay, relay.url + "/")

        async def ceiling() -> None:
            vm2 = await attach_vm(res, "vm2", relay, relay.url + "/")
            server = await res.start(
                "iperf3-vm2", "iperf3", "--server", "--bind", vm2.ip, "--forceflush", ns=vm2.ns
            )
            log = res.workdir / "iperf3-vm2.log"
            await wait_for_text(log, "Server listening", server, "iperf3")
            both = Vm(vm1.ns, vm1.dev, vm1.ip, {**vm1.pids, "tap2": vm2.pids["tap"]})
            await self.transfers("ceiling", both, vm2.ip, relay)

        async def through_nat() -> None:
            await self.transfers("nat", vm1, INET_SERVER, relay)
            await self.attempt(
                "nat_http", relay, lambda: http_download(vm1, size, digest, p.http_timeout())
            )

        async def slirp() -> None:
            guest = await attach_slirp(res, p.slirp_mtu)
            await self.transfers("slirp", guest, INET_SERVER, None)
            await self.attempt(
                "slirp_http", None, lambda: http_download(guest, size, digest, p.http_timeout())
            )

        async def lossy_path() -> None:
            host, port = relay.url.removeprefix("https://").rsplit(":", 1)
            lossy = LossyForwarder((host, int(port)), 0.0, seed=p.seed)
            forward_port = await nursery.start(lossy.run)
            vm3 = await attach_vm(res, "loss", relay, f"https://{HOST}:{forward_port}/")
            vm3.pids["forwarder"] = os.getpid()
            await self.transfers("path", vm3, INET_SERVER, relay)  # the baseline: no loss
            lossy.loss = p.loss
            before = lossy.counts()
            await self.transfers("loss", vm3, INET_SERVER, relay)
            after = lossy.counts()
            for name in ("loss_up", "loss_down"):
                if name in self.found:
                    self.found[name]["forwarder"] = {k: after[k] - before[k] for k in after}

        await self.stage("ceiling", relay, ceiling)
        await self.stage("nat", relay, through_nat)
        if p.slirp:
            await self.stage("slirp", None, slirp)
        else:
            self.skipped += STAGES["slirp"]
        if p.lossy:
            await self.stage("loss", relay, lossy_path)
        else:
            self.skipped += STAGES["loss"]


async def _watch_sigterm(cancel: trio.CancelScope, hit: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for signum in signals:
            hit.append(signum)
            cancel.cancel()


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception a nursery wrapped: a BenchError or Ctrl-C first, else the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kind in (KeyboardInterrupt, BenchError, trio.TooSlowError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group


async def bench(params: NatParams, workdir: Path) -> dict[str, Any]:
    res = Resources(workdir)
    run_ = Bench(params, res)
    load_before = os.getloadavg()[0]
    terminated: list[int] = []
    try:
        with trio.fail_after(params.budget()):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_sigterm, nursery.cancel_scope, terminated)
                await run_.run(nursery)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    finally:
        await res.aclose()
    if terminated:
        raise BenchError("terminated (SIGTERM); everything it made is removed")
    return {
        "bench": "nat",
        "params": params.as_dict(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "guest_mtu": GUEST_MTU,
        "slirp_mtu": params.slirp_mtu,
        "measurements": {k: run_.found[k] for k in MEASUREMENTS if k in run_.found},
        "errors": run_.errors,
        "skipped": run_.skipped,
        "ratios": ratios(run_.found, run_.errors, run_.skipped),
    }


def run_nat(params: NatParams) -> dict[str, Any]:
    """Run the benchmark and return its report (see :func:`nat_report.format_report`).

    Raises :class:`BenchError` for an unusable setting, a missing tool or privilege, or a
    topology that cannot be built; a measurement that fails is in the report's ``errors``.
    """
    params.check()
    check_host({**netns.TOOLS, **({"slirp4netns": "slirp4netns"} if params.slirp else {})})
    with tempfile.TemporaryDirectory(prefix="relay-bench-nat-") as tmp:
        try:
            report: dict[str, Any] = trio.run(bench, params, Path(tmp))
        except trio.TooSlowError:
            raise BenchError("the benchmark did not finish in time") from None
    return report
