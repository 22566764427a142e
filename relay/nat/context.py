"""What every NAT flow shares: settings, the flow budget, counters, the nursery flows run in."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from relay.logs import RateLimitedLog
from relay.nat.limits import FlowBudget
from relay.nat.settings import NatSettings

log = logging.getLogger("relay.nat")
drop_log = RateLimitedLog(log, level=logging.WARNING)


@dataclass
class NatContext:
    """Shared by the NAT's parts; mutated only from trio tasks of one thread."""

    settings: NatSettings
    budget: FlowBudget
    events: Counter[str] = field(default_factory=Counter)
    """Flows opened and closed, by protocol and reason."""
    drops: Counter[str] = field(default_factory=Counter)
    """Packets from guests that were not forwarded, by reason."""
    nursery: trio.Nursery | None = None

    def drop(self, reason: str, message: str = "NAT dropped a packet", *args: object) -> None:
        self.drops[reason] += 1
        drop_log.event(reason, f"{message} (%s)", *args, reason)

    def spawn(self, task: Callable[[], Awaitable[None]], name: str) -> bool:
        """Start a flow's task; False before the NAT runs or after it stopped."""
        if self.nursery is None:
            return False
        self.nursery.start_soon(task, name=name)
        return True
