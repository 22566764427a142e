"""A UDP forwarder on loopback that loses a share of the datagrams in each direction.

This kernel has no ``netem``; a client pointed at the forwarder instead of the relay sees
a lossy path, as a browser on a bad network would. The losses come from a seeded random
generator, so a failing run can be replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

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
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def _lose(self) -> bool:
        if self._random.random() < self.loss:
            self.dropped += 1
            return True
        self.forwarded += 1
        return False

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        front = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await front.bind(("127.0.0.1", self.port))
        self.port = front.getsockname()[1]
        backs: dict[tuple[str, int], trio.socket.SocketType] = {}
        try:
            await self._forward(front, backs, task_status)
        finally:
            front.close()
            for back in backs.values():
                back.close()

    async def _forward(
        self,
        front: trio.socket.SocketType,
        backs: dict[tuple[str, int], trio.socket.SocketType],
        task_status: trio.TaskStatus[int],
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            while True:
                data, client = await front.recvfrom(65536)
                back = backs.get(client)
                if back is None:
                    if len(backs) >= MAX_CLIENTS:
                        continue
                    back = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                    await back.connect(self.target)
                    backs[client] = back
                    nursery.start_soon(self._backward, back, front, client)
                if not self._lose():
                    await back.send(data)

    async def _backward(
        self,
        back: trio.socket.SocketType,
        front: trio.socket.SocketType,
        client: tuple[str, int],
    ) -> None:
        while True:
            try:
                data = await back.recv(65536)
            except OSError:
                continue  # ICMP port unreachable while the relay restarts
            if not self._lose():
                await front.sendto(data, client)
