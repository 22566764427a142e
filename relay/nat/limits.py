"""NAT budgets: how many flows, how fast and how many bytes each VM may use (sans-IO).

Every flow costs the relay a host socket (a file descriptor) and memory, so a guest must not
be able to take them all (doc §2.4, §2.6). :class:`FlowBudget` is the one ledger per relay:

* a per-VM cap per protocol (:attr:`NatLimits.tcp_per_vm` and friends) and a global cap on
  all flows, kept well below ``LimitNOFILE``;
* a per-VM new-flows token bucket, checked last, so a flow refused by a cap costs no token;
* a per-VM cap on half-open TCP (SYN seen, not yet established);
* per-VM byte buckets, one per direction: ``out`` (guest to internet, the abuse direction) and
  ``in`` (replies pushed to the browser); a refusal means drop the packet or pause reading.

UDP at its per-VM cap is not refused: the driver evicts the VM's least recently used UDP flow
(RFC 4787 lets an idle mapping go), calling :meth:`FlowBudget.release` for it and then
:meth:`FlowBudget.admit` for the new one; :meth:`FlowBudget.at_cap` tells it when to. If the
new-flow bucket then refuses, the evicted flow stays gone: it was the idlest one anyway.

Time is passed in (``now``, seconds, monotonic); a clock that steps back refills nothing.
Memory is bounded: a VM with no flows is forgotten once its buckets have refilled (forgetting
it earlier would hand it a fresh burst), lazily on later calls or by :meth:`FlowBudget.sweep`.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from relay.errors import ConfigError
from relay.nat.policy import Proto

MAX_PACKET = 65_536
"""The largest single read or datagram :meth:`FlowBudget.take_bytes` must be able to pass."""

_SWEEP_PER_CALL = 2
_SLACK = 1e-9
"""Tokens a take may be short by: absorbs rounding in ``elapsed * rate``."""


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    The level is recomputed from the last successful take, not accumulated on every look, so
    refusals add no rounding error, and a take within ``_SLACK`` of the level succeeds: 0.05 s
    twice at 10/s is one token, although (100.05 - 100) * 10 is 0.4999... in floating point.
    A clock that does not move forward (or is not finite) refills nothing.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not (rate >= 0 and burst > 0 and math.isfinite(rate) and math.isfinite(burst)):
            raise ValueError(f"bad token bucket: rate {rate}, burst {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp: float | None = None  # when _tokens was the level; None: never taken

    def level(self, now: float) -> float:
        """Tokens available at ``now``; changes nothing."""
        stamp = self._stamp
        if stamp is None or not (now > stamp and math.isfinite(now)):
            return self._tokens
        return min(self.burst, self._tokens + (now - stamp) * self.rate)

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` tokens if there are that many; otherwise spend nothing."""
        tokens = self.level(now)
        if tokens + _SLACK < amount:
            return False
        self._tokens = max(0.0, tokens - amount)
        if math.isfinite(now) and (self._stamp is None or now > self._stamp):
            self._stamp = now
        return True

    def full(self, now: float) -> bool:
        """True if the bucket has refilled completely by ``now`` (it would start so anew)."""
        return self.level(now) + _SLACK >= self.burst


@dataclass(frozen=True, slots=True)
class NatLimits:
    """The NAT's bounds; the per-VM ones apply to each VM separately."""

    tcp_per_vm: int = 256
    udp_per_vm: int = 256
    icmp_per_vm: int = 64
    new_flows_per_second: float = 50.0
    new_flows_burst: int = 100
    bytes_per_second: float = 12_500_000.0
    """Per VM and per direction: 100 Mbit/s."""
    bytes_burst: int = 2_000_000
    global_flows: int = 16384
    """All protocols of all VMs together."""
    tcp_syn_per_vm: int = 64
    """Half-open TCP flows (SYN seen, not yet established) per VM."""

    def __post_init__(self) -> None:
        counts = ("tcp_per_vm", "udp_per_vm", "icmp_per_vm", "new_flows_burst")
        for name in (*counts, "global_flows", "tcp_syn_per_vm"):
            if getattr(self, name) < 1:
                raise ConfigError(f"NAT limit {name} must be at least 1")
        for name in ("new_flows_per_second", "bytes_per_second"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"NAT limit {name} must be a positive number")
        if self.bytes_burst < MAX_PACKET:
            raise ConfigError(f"NAT limit bytes_burst must be at least {MAX_PACKET} (one packet)")

    def per_vm(self, proto: Proto) -> int:
        """The per-VM flow cap for ``proto``."""
        if proto is Proto.TCP:
            return self.tcp_per_vm
        if proto is Proto.UDP:
            return self.udp_per_vm
        return self.icmp_per_vm


class Refusal(Enum):
    """Why :meth:`FlowBudget.admit` (or ``half_open``) said no; the value is a counter label."""

    VM_FLOWS = "vm_flows"
    NEW_FLOW_RATE = "new_flow_rate"
    GLOBAL_FLOWS = "global_flows"
    HALF_OPEN = "half_open"


class _Vm:
    """One VM's ledger."""

    __slots__ = ("bytes_in", "bytes_out", "flows", "half_open", "new_flows")

    def __init__(self, limits: NatLimits) -> None:
        self.flows = dict.fromkeys(Proto, 0)
        self.half_open = 0
        self.new_flows = TokenBucket(limits.new_flows_per_second, limits.new_flows_burst)
        self.bytes_out = TokenBucket(limits.bytes_per_second, limits.bytes_burst)
        self.bytes_in = TokenBucket(limits.bytes_per_second, limits.bytes_burst)

    def idle(self) -> bool:
        return self.half_open == 0 and not any(self.flows.values())

    def rested(self, now: float) -> bool:
        """Idle with full buckets: forgetting it now grants nothing a new VM would not get."""
        return (
            self.idle()
            and self.new_flows.full(now)
            and self.bytes_out.full(now)
            and self.bytes_in.full(now)
        )


class FlowBudget:
    """The relay's flow ledger; VMs are keyed by any hashable (the driver: (lan, vm ip))."""

    def __init__(self, limits: NatLimits) -> None:
        self.limits = limits
        self.refusals: Counter[str] = Counter()
        self._vms: dict[Hashable, _Vm] = {}
        self._idle: OrderedDict[Hashable, None] = OrderedDict()  # no flows; oldest first
        self._totals = dict.fromkeys(Proto, 0)
        self._total = 0

    def _vm(self, vm: Hashable) -> _Vm:
        state = self._vms.get(vm)
        if state is None:
            state = self._vms[vm] = _Vm(self.limits)
        return state

    def _settle(self, vm: Hashable, state: _Vm) -> None:
        """Keep ``_idle`` exact: a VM is in it if and only if it has no flows."""
        if state.idle():
            self._idle.setdefault(vm, None)
        else:
            self._idle.pop(vm, None)

    def _sweep_some(self, now: float) -> None:
        """Look at the oldest idle VMs; forget rested ones, requeue the others."""
        for _ in range(min(_SWEEP_PER_CALL, len(self._idle))):
            vm, _ = self._idle.popitem(last=False)
            if self._vms[vm].rested(now):
                del self._vms[vm]
            else:
                self._idle[vm] = None

    def sweep(self, now: float) -> int:
        """Forget every idle VM whose buckets are full again; the number forgotten."""
        gone = [vm for vm in self._idle if self._vms[vm].rested(now)]
        for vm in gone:
            del self._idle[vm]
            del self._vms[vm]
        return len(gone)

    def at_cap(self, vm: Hashable, proto: Proto) -> bool:
        """True if ``vm`` has as many ``proto`` flows as it may (UDP: evict before admitting)."""
        return self.vm_flows(vm, proto) >= self.limits.per_vm(proto)

    def admit(self, vm: Hashable, proto: Proto, now: float) -> Refusal | None:
        """Count a new flow, or say why not: per-VM cap, global cap, then the new-flow rate."""
        self._sweep_some(now)
        state = self._vms.get(vm)
        refusal: Refusal | None = None
        if state is not None and state.flows[proto] >= self.limits.per_vm(proto):
            refusal = Refusal.VM_FLOWS
        elif self._total >= self.limits.global_flows:
            refusal = Refusal.GLOBAL_FLOWS
        else:
            state = self._vm(vm) if state is None else state
            if not state.new_flows.take(now):
                refusal = Refusal.NEW_FLOW_RATE
        if refusal is not None:
            self.refusals[refusal.value] += 1
            if state is not None:
                self._settle(vm, state)
            return refusal
        assert state is not None
        state.flows[proto] += 1
        self._totals[proto] += 1
        self._total += 1
        self._idle.pop(vm, None)
        return None

    def release(self, vm: Hashable, proto: Proto) -> None:
        """A flow admitted earlier has ended; an unknown VM or a zero count stays as it is."""
        state = self._vms.get(vm)
        if state is None or state.flows[proto] == 0:
            return
        state.flows[proto] -= 1
        self._totals[proto] -= 1
        self._total -= 1
        self._settle(vm, state)

    def half_open(self, vm: Hashable, delta: int) -> bool:
        """Move ``vm``'s half-open TCP count by ``delta`` (+1 at SYN, -1 once established or
        gone); False, and no change, if it would pass ``tcp_syn_per_vm``. Never below 0."""
        if delta <= 0:
            state = self._vms.get(vm)
            if state is not None and delta:
                state.half_open = max(0, state.half_open + delta)
                self._settle(vm, state)
            return True
        state = self._vm(vm)
        if state.half_open + delta > self.limits.tcp_syn_per_vm:
            self.refusals[Refusal.HALF_OPEN.value] += 1
            self._settle(vm, state)
            return False
        state.half_open += delta
        self._idle.pop(vm, None)
        return True

    def take_bytes(
        self, vm: Hashable, direction: Literal["out", "in"], count: int, now: float
    ) -> bool:
        """Spend ``count`` bytes of ``vm``'s ``direction`` bucket; False: drop or pause."""
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', not {direction!r}")
        self._sweep_some(now)
        state = self._vm(vm)
        ok = (state.bytes_out if direction == "out" else state.bytes_in).take(now, count)
        self._settle(vm, state)
        return ok

    def flows(self, proto: Proto | None = None) -> int:
        """Flows open now, of ``proto`` or of all protocols (for metrics)."""
        return self._total if proto is None else self._totals[proto]

    def vm_flows(self, vm: Hashable, proto: Proto) -> int:
        """``vm``'s open ``proto`` flows."""
        state = self._vms.get(vm)
        return 0 if state is None else state.flows[proto]

    def vm_half_open(self, vm: Hashable) -> int:
        """``vm``'s half-open TCP flows."""
        state = self._vms.get(vm)
        return 0 if state is None else state.half_open

    @property
    def tracked_vms(self) -> int:
        """VMs with an entry (with flows, or idle but not yet rested): bounded memory check."""
        return len(self._vms)
