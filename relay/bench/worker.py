"""One benchmark client: a separate OS process driving one :class:`~relay.client.RelayClient`.

The runner starts it as ``python -m relay.bench.worker --role ... --mode ...`` and talks to it
over pipes, one line at a time:

* worker → runner (stdout): ``{"event": "ready", "ip": ...}`` once connected (and registered,
  in relay mode, with the address the relay assigned), then ``{"event": "result", ...}``
  with its figures. Nothing else goes to stdout.
* runner → worker (stdin): ``go`` starts the measurement, ``stop`` ends it (sinks and pongs
  stop counting; everybody closes). End of file means ``stop``: a worker never outlives a
  runner that died.

Roles:

``source``
    send ``size``-byte frames for ``seconds``, as fast as the client's own queue allows, or at
    ``rate`` frames/s.
``sink``
    count the frames that arrive until ``stop``, plus a short idle drain.
``echo-flood``
    ``source`` and ``sink`` in one process, against the echo baseline.
``ping``
    one frame in flight: send, wait for it to come back, record the round-trip time.
``pong``
    send every frame back (through the relay: the ``ping`` peer on the same LAN).

In ``relay`` mode the worker registers its MAC first; in ``echo`` mode it does not (the echo
server does not speak Register). Frames are IPv4/UDP to the discard port, from the worker's
assigned address to ``--peer-ip`` (the switch's port security drops any other source address
and any non-IP EtherType); their payload is the pair index, a sequence number and a
``time.monotonic()`` send time (CLOCK_MONOTONIC is system-wide, so one-way delays between
processes on one host are meaningful).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import trio

from relay.client import RelayClient, connect, random_mac
from relay.errors import RelayError

UDP_PORT = 9
"""The discard port: a stray benchmark frame reaching a real host is ignored."""
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_HEADER = struct.Struct("!IQd")
"""Pair index, sequence number, send time — right after the Ethernet, IPv4 and UDP headers."""
_PAYLOAD_AT = 14 + _IPV4.size + _UDP.size
MIN_SIZE = _PAYLOAD_AT + _HEADER.size
ECHO_IP = IPv4Address("10.0.2.15")
"""The source address of frames the echo baseline bounces (it registers nothing)."""
MAX_SIZE = 1514

BURST = 32
"""Frames sent between two yields to the client's receive loop."""
HIGH_WATER = 128
"""Datagrams waiting in the client's own queue above which the sender backs off."""
BACKOFF = 0.0005
"""Seconds a sender sleeps when its queue is above the high-water mark."""
IDLE_DRAIN = 0.25
"""After ``stop``, a sink keeps counting until no frame arrived for this long ..."""
MAX_DRAIN = 2.0
"""... but for no longer than this."""
PING_TIMEOUT = 1.0
"""A ping not answered within this is lost."""
PING_WARMUP = 20
"""Pings sent first and not measured."""
SAMPLES = 4000
"""Delay samples a sink reports (evenly thinned)."""


class WorkerError(Exception):
    """The worker cannot do what it was asked."""


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the runner."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thin(values: list[float], limit: int = SAMPLES) -> list[float]:
    """At most ``limit`` values, evenly spaced through ``values``."""
    if len(values) <= limit:
        return values
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


def _checksum(header: bytes) -> int:
    total = sum(int(word) for word in struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class FrameMaker:
    """Builds this worker's frames: IPv4/UDP from the port's own address (what the switch's
    port security lets through), then pair, sequence, send time and padding."""

    def __init__(
        self,
        src: bytes,
        dst: bytes,
        src_ip: IPv4Address,
        dst_ip: IPv4Address,
        pair: int,
        size: int,
    ) -> None:
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise WorkerError(f"frame size must be within {MIN_SIZE}-{MAX_SIZE}, not {size}")
        ip_length = size - 14
        ip = [0x45, 0, ip_length, 0, 0x4000, 64, 17, 0, src_ip.packed, dst_ip.packed]
        ip[7] = _checksum(_IPV4.pack(*ip))
        udp = _UDP.pack(UDP_PORT, UDP_PORT, ip_length - _IPV4.size, 0)  # checksum 0: none
        self._prefix = dst + src + b"\x08\x00" + _IPV4.pack(*ip) + udp
        self._padding = bytes(size - MIN_SIZE)
        self._pair = pair
        self._pack = _HEADER.pack

    def make(self, seq: int) -> bytes:
        return self._prefix + self._pack(self._pair, seq, time.monotonic()) + self._padding


def parse_frame(frame: bytes) -> tuple[int, int, float] | None:
    """(pair, sequence, send time) of a benchmark frame, or None for anything else."""
    if (
        len(frame) < MIN_SIZE
        or frame[12:14] != b"\x08\x00"
        or frame[23] != 17
        or frame[36:38] != b"\x00\x09"
    ):
        return None
    pair, seq, sent_at = _HEADER.unpack_from(frame, _PAYLOAD_AT)
    return pair, seq, sent_at


def turn_around(frame: bytes) -> bytes:
    """``frame`` back to its sender: MACs and IPv4 addresses swapped (the checksum holds)."""
    return frame[6:12] + frame[0:6] + frame[12:26] + frame[30:34] + frame[26:30] + frame[34:]


class Control:
    """``go`` and ``stop`` from the runner, read from stdin."""

    def __init__(self) -> None:
        self.go = trio.Event()
        self.stop = trio.Event()

    async def read(self) -> None:
        stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        try:
            async with stream:
                while not self.stop.is_set():
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        command = line.strip()
                        if command == b"go":
                            self.go.set()
                        elif command == b"stop":
                            self.go.set()
                            self.stop.set()
        finally:
            self.go.set()
            self.stop.set()


@dataclass
class Counts:
    """What a receiving role saw."""

    frames: int = 0
    foreign: int = 0
    reordered: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    delays: list[float] = field(default_factory=list)
    _next_seq: int = 0

    def add(self, frame: bytes, now: float) -> None:
        parsed = parse_frame(frame)
        if parsed is None:
            self.foreign += 1
            return
        _, seq, sent_at = parsed
        if not self.frames:
            self.first_at = now
        self.frames += 1
        self.last_at = now
        self.delays.append(now - sent_at)
        if seq < self._next_seq:
            self.reordered += 1
        else:
            self._next_seq = seq + 1

    def report(self) -> dict[str, Any]:
        return {
            "frames_received": self.frames,
            "foreign_frames": self.foreign,
            "reordered": self.reordered,
            "receive_span": max(0.0, self.last_at - self.first_at),
            "delays": thin(self.delays),
        }


async def each_frame(client: RelayClient, handle: Callable[[bytes, float], None]) -> None:
    """Call ``handle(frame, arrival time)`` for every frame, draining a batch per wake-up."""
    frames = client.frames
    while True:
        try:
            frame = await frames.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return
        now = time.monotonic()
        handle(frame, now)
        while True:
            try:
                frame = frames.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            handle(frame, now)


async def count_frames(client: RelayClient, counts: Counts) -> None:
    """Count every frame that arrives."""
    await each_frame(client, counts.add)


async def drain_until_idle(counts: Counts) -> None:
    """Return once no frame arrived for :data:`IDLE_DRAIN` s (at most :data:`MAX_DRAIN` s)."""
    give_up = time.monotonic() + MAX_DRAIN
    seen, quiet_since = counts.frames, time.monotonic()
    while True:
        await trio.sleep(IDLE_DRAIN / 5)
        now = time.monotonic()
        if counts.frames != seen:
            seen, quiet_since = counts.frames, now
        if now - quiet_since >= IDLE_DRAIN or now >= give_up:
            return


def queued(client: RelayClient) -> int:
    """Datagrams the client has accepted but not yet handed to the network."""
    return len(client._queue) + len(client._quic._datagrams_pending)


async def send_frames(
    client: RelayClient, maker: FrameMaker, seconds: float, rate: int | None
) -> dict[str, Any]:
    """Flood (or pace at ``rate``) for ``seconds``; then let the client's queue empty."""
    queue_drops_before = sum(client._queue.drops.values())
    udp_drops_before = client.drops["udp_send"]
    sent = stalls = 0
    started = time.monotonic()
    end = started + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        budget = BURST
        if rate:
            due = int((now - started) * rate) + 1 - sent
            if due <= 0:
                await trio.sleep(min(end, started + sent / rate) - now)
                continue
            budget = min(budget, due)
        if len(client._queue) >= HIGH_WATER:
            stalls += 1
            await trio.sleep(BACKOFF)
            continue
        for _ in range(budget):
            client.send_frame(maker.make(sent))
            sent += 1
        await trio.lowlevel.checkpoint()
    duration = time.monotonic() - started
    with trio.move_on_after(MAX_DRAIN):
        while queued(client):  # noqa: ASYNC110 (the client has no "queue empty" event)
            await trio.sleep(0.001)
    return {
        "frames_sent": sent,
        "send_duration": duration,
        "datagrams_sent": client.stats.datagrams_sent,
        "sender_queue_drops": sum(client._queue.drops.values()) - queue_drops_before,
        "sender_udp_drops": client.drops["udp_send"] - udp_drops_before,
        "unsent_at_end": queued(client),
        "stalls": stalls,
        "queue_peak": client._queue.peak,
    }


async def ping(
    client: RelayClient, maker: FrameMaker, count: int, seconds: float
) -> dict[str, Any]:
    """One frame in flight: send, wait for the same sequence number to come back."""
    rtts: list[float] = []
    lost = 0
    give_up = time.monotonic() + seconds
    for seq in range(count + PING_WARMUP):
        if seq >= PING_WARMUP and time.monotonic() >= give_up:
            break
        started = time.monotonic()
        client.send_frame(maker.make(seq))
        with trio.move_on_after(PING_TIMEOUT) as scope:
            while True:
                parsed = parse_frame(await client.receive_frame())
                if parsed is not None and parsed[1] == seq:
                    break
        if seq < PING_WARMUP:
            continue
        if scope.cancelled_caught:
            lost += 1
        else:
            rtts.append(time.monotonic() - started)
    return {"pings": len(rtts) + lost, "lost": lost, "rtts": rtts}


async def pong(client: RelayClient, delays: list[float]) -> None:
    """Send every frame back with the MACs swapped; record its one-way delay."""

    def bounce(frame: bytes, now: float) -> None:
        client.send_frame(turn_around(frame))
        parsed = parse_frame(frame)
        if parsed is not None and parsed[1] >= PING_WARMUP:
            delays.append(now - parsed[2])

    await each_frame(client, bounce)


def client_drops(client: RelayClient) -> dict[str, int]:
    drops = {f"client_{k}": v for k, v in client.drops.items()}
    drops.update({f"queue_{k}": v for k, v in client._queue.drops.items()})
    return drops


async def run_role(args: argparse.Namespace, client: RelayClient, control: Control) -> None:
    mac, peer_mac = bytes.fromhex(args.mac), bytes.fromhex(args.peer_mac)
    own_ip = client.assigned.ip if client.assigned is not None else ECHO_IP
    maker = FrameMaker(mac, peer_mac, own_ip, args.peer_ip, args.pair, args.size)
    rate = args.rate or None
    await control.go.wait()
    cpu_before = cpu_seconds()
    result: dict[str, Any] = {"role": args.role, "pair": args.pair}
    if args.role == "source":
        result.update(await send_frames(client, maker, args.seconds, rate))
    elif args.role == "sink":
        counts = Counts()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_frames, client, counts)
            await control.stop.wait()
            await drain_until_idle(counts)
            nursery.cancel_scope.cancel()
        result.update(counts.report())
    elif args.role == "echo-flood":
        counts = Counts()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_frames, client, counts)
            result.update(await send_frames(client, maker, args.seconds, rate))
            await drain_until_idle(counts)
            nursery.cancel_scope.cancel()
        result.update(counts.report())
    elif args.role == "ping":
        result.update(await ping(client, maker, args.count, args.seconds))
    elif args.role == "pong":
        delays: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pong, client, delays)
            await control.stop.wait()
            nursery.cancel_scope.cancel()
        result.update(frames_echoed=len(delays), delays=thin(delays))
    else:
        raise WorkerError(f"unknown role {args.role!r}")
    result["cpu"] = cpu_seconds() - cpu_before
    result["drops"] = client_drops(client)
    result["datagrams_received"] = client.stats.datagrams_received
    emit("result", **result)


async def worker(args: argparse.Namespace) -> None:
    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            control = Control()
            nursery.start_soon(control.read)
            client = await connect(nursery, args.url, cert_hash=args.cert_hash)
            try:
                if args.mode == "relay":
                    await client.register(bytes.fromhex(args.mac))
                ip = client.assigned.ip if client.assigned is not None else None
                emit("ready", role=args.role, pair=args.pair, ip=ip and str(ip))
                await run_role(args, client, control)
                await control.stop.wait()
            finally:
                await client.aclose()
            nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m relay.bench.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--cert-hash", required=True)
    parser.add_argument("--mode", choices=("relay", "echo"), default="relay")
    parser.add_argument(
        "--role", required=True, choices=("source", "sink", "echo-flood", "ping", "pong")
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=0, help="frames/s; 0: as fast as possible")
    parser.add_argument("--count", type=int, default=2000, help="pings")
    parser.add_argument("--pair", type=int, default=0)
    parser.add_argument("--mac", default=None)
    parser.add_argument("--peer-mac", default="ffffffffffff")
    parser.add_argument(
        "--peer-ip",
        type=IPv4Address,
        default=ECHO_IP,
        help="destination address of the frames (the receiver's, through the relay)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: 4 x seconds + 30)",
    )
    args = parser.parse_args(argv)
    args.mac = args.mac or random_mac().hex()
    if args.timeout is None:
        args.timeout = 4 * args.seconds + 30
    if not math.isfinite(args.seconds) or args.seconds <= 0:
        parser.error("--seconds must be positive")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        parser.error(f"--size must be within {MIN_SIZE}-{MAX_SIZE}")
    return args


def leaf_exception(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (or ``exc`` itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trio.run(worker, args)
    except BaseException as exc:
        leaf = leaf_exception(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if isinstance(leaf, trio.TooSlowError):
            print(f"bench worker {args.role}: timed out after {args.timeout:g} s", file=sys.stderr)
            return 1
        if isinstance(leaf, RelayError | WorkerError):
            print(f"bench worker {args.role}: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
