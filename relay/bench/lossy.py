"""A UDP forwarder on loopback that drops a share of the datagrams each way (seeded).

This kernel has no ``netem``; a ``relay tap`` pointed at the forwarder instead of the relay sees
a lossy path, as a browser on a bad network would. It reads and sends in batches on
non-blocking sockets (one trio wake-up per batch, not per datagram), so the forwarder itself
stays well below the rates it carries. The losses come from a seeded generator, so a run can
be replayed.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

import trio

BATCH = 256
"""Datagrams read per wake-up."""
MAX_CLIENTS = 16


@dataclass
class LossyForwarder:
    """Forward ``127.0.0.1:port`` ↔ ``target``, dropping ``loss`` of the datagrams."""

    target: tuple[str, int]
    loss: float
    seed: int = 1
    port: int = 0
    forwarded: int = 0
    dropped: int = 0
    send_failed: int = 0
    """Datagrams lost because a socket buffer was full (not chosen by the generator)."""
    lost_one: trio.Event = field(default_factory=trio.Event)
    """Set at the first datagram the generator drops (a test's cue that loss has happened)."""
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def counts(self) -> dict[str, int]:
        return {
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "send_failed": self.send_failed,
        }

    def _lose(self) -> bool:
        if self._random.random() < self.loss:
            self.dropped += 1
            self.lost_one.set()
            return True
        self.forwarded += 1
        return False

    def _send(self, sock: socket.socket, data: bytes, to: tuple[str, int] | None) -> None:
        try:
            if to is None:
                sock.send(data)
            else:
                sock.sendto(data, to)
        except OSError:  # full buffer, or ICMP unreachable from an earlier send
            self.send_failed += 1

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until cancelled; ``task_status`` gets the bound port."""
        front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        front.setblocking(False)
        backs: dict[tuple[str, int], socket.socket] = {}
        try:
            front.bind(("127.0.0.1", self.port))
            self.port = front.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                while True:
                    await trio.lowlevel.wait_readable(front)
                    for _ in range(BATCH):
                        try:
                            data, client = front.recvfrom(65536)
                        except BlockingIOError:
                            break
                        back = backs.get(client)
                        if back is None:
                            if len(backs) >= MAX_CLIENTS:
                                continue
                            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            back.setblocking(False)
                            back.connect(self.target)
                            backs[client] = back
                            nursery.start_soon(self._backward, back, front, client)
                        if not self._lose():
                            self._send(back, data, None)
        finally:
            front.close()
            for back in backs.values():
                back.close()

    async def _backward(
        self, back: socket.socket, front: socket.socket, client: tuple[str, int]
    ) -> None:
        while True:
            await trio.lowlevel.wait_readable(back)
            for _ in range(BATCH):
                try:
                    data = back.recv(65536)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # ICMP port unreachable from an earlier send
                if not self._lose():
                    self._send(front, data, client)
