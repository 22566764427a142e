"""ICMP echo to the outside without root: real replies, real payload, real round-trip time.

Modes, chosen once at start (``--icmp-mode``, logged):

* ``socket``: Linux ping sockets (``SOCK_DGRAM``/``IPPROTO_ICMP``), allowed when the relay's
  group is in ``net.ipv4.ping_group_range``. One connected socket per (VM, echo id,
  destination); the kernel replaces the echo id with the socket's own, so replies get the
  guest's id back.
* ``raw``: one raw ICMP socket (needs ``CAP_NET_RAW``); the relay picks a wire id per flow and
  demultiplexes replies by (source, id).
* ``command``: the system ``ping`` run per echo request (:mod:`relay.nat.icmp_command`), for
  hosts where only a setuid or capability-carrying ``ping`` may send ICMP.
* ``off``: none of these is permitted; echo requests get ICMP "administratively prohibited". Never
  a fabricated reply: a fake ping makes unreachable hosts look alive.
"""

from __future__ import annotations

import itertools
import shutil
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import trio

from relay.errors import ConfigError
from relay.nat.context import NatContext, log
from relay.nat.guest import Guest
from relay.nat.icmp_command import MAX_PAYLOAD, find_ping, ping_once
from relay.nat.icmp_echo import (
    EchoRequest,
    echo_id,
    echo_reply,
    is_echo_reply,
    parse_echo_request,
    raw_echo_reply,
    with_id,
)
from relay.nat.policy import Proto
from relay.nat.settings import IcmpMode
from relay.packets import build
from relay.packets.headers import IPPROTO_ICMP

EchoKey = tuple[str, bytes, int, bytes]
"""(LAN, VM address, the guest's echo id, destination)."""
RECEIVE_SIZE = 65535
COMMAND_WAIT = 3
"""Seconds a ``ping`` process waits for its reply (command mode)."""
COMMAND_CONCURRENCY = 16
"""``ping`` processes running at once, all VMs together; requests beyond are dropped."""
COMMAND_QUEUE = 4


def _open(kind: int) -> socket.socket:
    return socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)


def detect_mode(requested: IcmpMode) -> IcmpMode:
    """The mode to use: the requested one if this process may, else (``auto``) the best one."""
    if requested is IcmpMode.OFF:
        return IcmpMode.OFF
    for mode, kind in ((IcmpMode.SOCKET, socket.SOCK_DGRAM), (IcmpMode.RAW, socket.SOCK_RAW)):
        if requested not in (IcmpMode.AUTO, mode):
            continue
        try:
            _open(kind).close()
        except OSError as exc:
            if requested is mode:
                raise ConfigError(f"--icmp-mode {mode.value}: {exc.strerror}") from None
            continue
        return mode
    if requested in (IcmpMode.AUTO, IcmpMode.COMMAND):
        if find_ping() is not None:
            return IcmpMode.COMMAND
        if requested is IcmpMode.COMMAND:
            raise ConfigError("--icmp-mode command: no ping command that can reach 127.0.0.1")
    return IcmpMode.OFF


def describe(mode: IcmpMode) -> str:
    return {
        IcmpMode.SOCKET: "ping sockets",
        IcmpMode.RAW: "a raw ICMP socket",
        IcmpMode.COMMAND: (
            "the ping command, one process per echo request (ping sockets are not permitted: "
            "widen net.ipv4.ping_group_range to the relay's group for the cheaper way)"
        ),
        IcmpMode.OFF: (
            "none: ping sockets are not permitted (widen net.ipv4.ping_group_range to the "
            "relay's group), raw sockets need CAP_NET_RAW and no ping command works; echo "
            "requests are refused"
        ),
        IcmpMode.AUTO: "auto",
    }[mode]


@dataclass(eq=False)
class EchoFlow:
    key: EchoKey
    guest: Guest
    wire_id: int
    last_used: float
    sock: socket.socket | None = None
    requests: trio.MemorySendChannel[bytes] | None = None
    """Command mode: echo requests waiting for a ``ping`` process."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def guest_id(self) -> int:
        return self.key[2]

    @property
    def dst(self) -> bytes:
        return self.key[3]


class IcmpNat:
    """Echo flows of every LAN."""

    def __init__(self, context: NatContext, mode: IcmpMode) -> None:
        assert mode is not IcmpMode.AUTO
        self.context = context
        self.mode = mode
        self.flows: dict[EchoKey, EchoFlow] = {}
        self._by_wire: dict[tuple[bytes, int], EchoFlow] = {}
        self._wire_ids = itertools.count(1)
        self._raw: socket.socket | None = None
        self._ping = shutil.which("ping") if mode is IcmpMode.COMMAND else None
        self._commands = trio.CapacityLimiter(COMMAND_CONCURRENCY)
        if mode is IcmpMode.RAW:
            self._raw = _open(socket.SOCK_RAW)
            self._raw.setblocking(False)

    async def run(self) -> None:
        """The raw socket's receive loop (raw mode); other modes need no task of their own."""
        raw = self._raw
        if raw is None:
            await trio.sleep_forever()
            return
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            while True:
                packet = await sock.recv(RECEIVE_SIZE)
                self._raw_reply(packet)
        finally:
            self._raw = None
            raw.close()

    def known(self, guest: Guest, packet: bytes, now: float) -> bool:
        """Forward an echo request of an existing flow; False if it needs a new one."""
        request = parse_echo_request(packet)
        if request is None:
            self.context.drop("icmp_unsupported", "ICMP other than echo request")
            return True
        flow = self.flows.get(_key(guest, request))
        if flow is None:
            return False
        self._send(flow, request.message, now)
        return True

    def open(self, guest: Guest, packet: bytes, now: float) -> None:
        context = self.context
        request = parse_echo_request(packet)
        assert request is not None
        if self.mode is IcmpMode.OFF:
            context.drop("icmp_unavailable", "no ICMP mode: echo refused")
            guest.send_unreachable(build.UNREACHABLE_ADMIN, packet)
            return
        refusal = context.budget.admit(guest.vm, Proto.ICMP, now)
        if refusal is not None:
            context.drop(f"icmp_{refusal.value}", "ICMP flow refused")
            return
        key = _key(guest, request)
        flow = EchoFlow(key, guest, self._next_wire_id(request.dst), now)
        if self.mode is IcmpMode.SOCKET:
            try:
                flow.sock = _open(socket.SOCK_DGRAM)
                flow.sock.setblocking(False)
                flow.sock.connect((str(IPv4Address(flow.dst)), 0))
            except OSError as exc:
                if flow.sock is not None:
                    flow.sock.close()
                context.budget.release(guest.vm, Proto.ICMP)
                context.drop("icmp_socket_error", "cannot open a ping socket: %s", exc.strerror)
                return
        receive: trio.MemoryReceiveChannel[bytes] | None = None
        if self.mode is IcmpMode.COMMAND:
            flow.requests, receive = trio.open_memory_channel[bytes](COMMAND_QUEUE)
        if not context.spawn(lambda: self._run_flow(flow, receive), name="nat icmp"):
            if flow.sock is not None:
                flow.sock.close()
            context.budget.release(guest.vm, Proto.ICMP)
            return
        self.flows[key] = flow
        self._by_wire[(flow.dst, flow.wire_id)] = flow
        context.events["icmp_opened"] += 1
        self._send(flow, request.message, now)

    def _next_wire_id(self, dst: bytes) -> int:
        for _ in range(0x10000):
            wire_id = next(self._wire_ids) & 0xFFFF
            if wire_id and (dst, wire_id) not in self._by_wire:
                return wire_id
        return 0

    def _send(self, flow: EchoFlow, message: bytes, now: float) -> None:
        context = self.context
        if not context.budget.take_bytes(flow.guest.vm, "out", len(message), now):
            context.drop("icmp_rate", "ICMP over the VM's byte rate")
            return
        flow.last_used = now
        try:
            if flow.requests is not None:
                if len(message) - 8 > MAX_PAYLOAD:
                    context.drop("icmp_too_big", "echo payload too big for the ping command")
                    return
                flow.requests.send_nowait(message)
            elif flow.sock is not None:
                flow.sock.send(message)  # the kernel sets the id and the checksum
            elif self._raw is not None:
                wire = with_id(message, flow.wire_id)
                self._raw.sendto(wire, (str(IPv4Address(flow.dst)), 0))
            else:
                context.drop("icmp_not_ready", "raw ICMP socket not open")
                return
        except (BlockingIOError, trio.WouldBlock):
            context.drop("icmp_send_would_block", "ICMP socket buffer or ping queue full")
        except OSError as exc:
            context.drop("icmp_send_error", "ICMP send failed: %s", exc.strerror)
        else:
            context.events["icmp_echo_out"] += 1

    def _reply(self, flow: EchoFlow, message: bytes) -> None:
        """An echo reply from ``flow.dst``: to the guest, with the guest's id."""
        if not is_echo_reply(message):
            return
        now = trio.current_time()
        if not self.context.budget.take_bytes(flow.guest.vm, "in", len(message), now):
            self.context.drop("icmp_rate_in", "ICMP reply over the VM's byte rate")
            return
        flow.last_used = now
        reply = with_id(message, flow.guest_id)
        flow.guest.send_packet(flow.dst, IPPROTO_ICMP, reply, self.context.settings.mtu)
        self.context.events["icmp_echo_in"] += 1

    def _raw_reply(self, packet: bytes) -> None:
        reply = raw_echo_reply(packet)
        if reply is None:
            return
        source, message = reply
        flow = self._by_wire.get((source, echo_id(message)))
        if flow is not None:
            self._reply(flow, message)

    async def _run_flow(
        self, flow: EchoFlow, requests: trio.MemoryReceiveChannel[bytes] | None
    ) -> None:
        idle = self.context.settings.icmp_idle
        try:
            with flow.scope:
                if requests is not None:
                    await self._run_commands(flow, requests)
                    return
                sock = None if flow.sock is None else trio.socket.from_stdlib_socket(flow.sock)
                while True:
                    deadline = flow.last_used + idle
                    if trio.current_time() >= deadline:
                        return
                    if sock is None:
                        await trio.sleep_until(deadline)
                        continue
                    with trio.move_on_at(deadline):
                        try:
                            message = await sock.recv(RECEIVE_SIZE)
                        except OSError:
                            continue  # an ICMP error about an earlier request
                        self._reply(flow, message)
        except Exception:
            log.exception("ICMP flow failed")
        finally:
            self._close(flow)

    async def _run_commands(
        self, flow: EchoFlow, requests: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        """Command mode: a ``ping`` process per request, until the flow is idle."""
        idle = self.context.settings.icmp_idle
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_at(flow.last_used + idle) as idle_scope:
                    message = await requests.receive()
                if idle_scope.cancelled_caught:
                    return
                try:
                    self._commands.acquire_on_behalf_of_nowait(message)
                except trio.WouldBlock:
                    self.context.drop("icmp_command_busy", "too many ping processes")
                    continue
                nursery.start_soon(self._ping_command, flow, message)

    async def _ping_command(self, flow: EchoFlow, message: bytes) -> None:
        try:
            assert self._ping is not None
            dst = str(IPv4Address(flow.dst))
            if await ping_once(self._ping, dst, len(message) - 8, COMMAND_WAIT):
                self._reply(flow, echo_reply(message))
        finally:
            self._commands.release_on_behalf_of(message)

    def _close(self, flow: EchoFlow) -> None:
        if self.flows.pop(flow.key, None) is None:
            return
        self._by_wire.pop((flow.dst, flow.wire_id), None)
        self.context.budget.release(flow.guest.vm, Proto.ICMP)
        flow.scope.cancel()
        if flow.sock is not None:
            trio.lowlevel.notify_closing(flow.sock)
            flow.sock.close()
        if flow.requests is not None:
            flow.requests.close()

    def close_lan(self, name: str) -> None:
        for flow in [f for f in self.flows.values() if f.key[0] == name]:
            self._close(flow)


def _key(guest: Guest, request: EchoRequest) -> EchoKey:
    return (guest.link.name, guest.ip, request.echo_id, request.dst)
