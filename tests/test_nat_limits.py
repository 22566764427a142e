"""NAT budgets: flow caps, new-flow rate, half-open TCP, byte buckets, bounded memory."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import ConfigError
from relay.nat.limits import MAX_PACKET, FlowBudget, NatLimits, Refusal, TokenBucket
from relay.nat.policy import Proto

VM_A = ("default", "10.0.2.254")
VM_B = ("default", "10.0.2.253")
FAST = NatLimits(new_flows_per_second=1e6, new_flows_burst=1_000_000)  # caps, not the rate


# --- token bucket ---------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(10.4)
    assert bucket.take(10.5)  # one token after 0.5 s at 2/s
    assert not bucket.take(10.5)
    assert bucket.full(1000.0)
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_bucket_amount_and_refusal_spends_nothing() -> None:
    bucket = TokenBucket(rate=100.0, burst=1000)
    assert bucket.take(0.0, 600)
    assert not bucket.take(0.0, 600)
    assert bucket.take(0.0, 400)
    assert not bucket.take(0.0, 1)


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(100.0)
    assert not bucket.take(99.0)  # no refill from going back ...
    assert not bucket.take(100.5)  # ... and the stamp did not move back either
    assert bucket.take(101.0)
    assert not bucket.take(math.nan)
    assert not bucket.take(math.inf)
    assert bucket.take(102.0)


def test_bucket_does_not_drift_over_many_small_refills() -> None:
    bucket = TokenBucket(rate=10.0, burst=5)
    now = 0.0
    for _ in range(100_000):
        now += 0.001
        bucket.take(now, 0.0)
    assert bucket.full(now)
    assert [bucket.take(now) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refuses_bad_parameters() -> None:
    for rate, burst in ((-1.0, 1.0), (1.0, 0.0), (math.inf, 1.0), (1.0, math.nan)):
        with pytest.raises(ValueError, match="bad token bucket"):
            TokenBucket(rate, burst)


# --- limits ---------------------------------------------------------------------------------


def test_limits_defaults_and_validation() -> None:
    limits = NatLimits()
    assert (limits.per_vm(Proto.TCP), limits.per_vm(Proto.UDP), limits.per_vm(Proto.ICMP)) == (
        256,
        256,
        64,
    )
    for bad in (
        {"tcp_per_vm": 0},
        {"global_flows": 0},
        {"tcp_syn_per_vm": 0},
        {"new_flows_burst": 0},
        {"new_flows_per_second": 0.0},
        {"bytes_per_second": math.nan},
        {"bytes_burst": MAX_PACKET - 1},
    ):
        with pytest.raises(ConfigError):
            NatLimits(**bad)


# --- flow budget ----------------------------------------------------------------------------


@pytest.mark.parametrize("proto", list(Proto))
def test_per_vm_cap_per_protocol(proto: Proto) -> None:
    limits = NatLimits(tcp_per_vm=3, udp_per_vm=4, icmp_per_vm=2, new_flows_burst=100)
    budget = FlowBudget(limits)
    cap = limits.per_vm(proto)
    for n in range(cap):
        assert not budget.at_cap(VM_A, proto)
        assert budget.admit(VM_A, proto, 0.0) is None
        assert budget.vm_flows(VM_A, proto) == n + 1
    assert budget.at_cap(VM_A, proto)
    assert budget.admit(VM_A, proto, 0.0) is Refusal.VM_FLOWS
    assert budget.refusals["vm_flows"] == 1
    other = next(p for p in Proto if p is not proto)
    assert budget.admit(VM_A, other, 0.0) is None  # another protocol has its own cap
    assert budget.admit(VM_B, proto, 0.0) is None  # another VM is unaffected
    assert budget.flows(proto) == cap + 1
    assert budget.flows() == cap + 2


def test_release_frees_a_slot_and_never_goes_below_zero() -> None:
    budget = FlowBudget(NatLimits(tcp_per_vm=1))
    assert budget.admit(VM_A, Proto.TCP, 0.0) is None
    assert budget.admit(VM_A, Proto.TCP, 0.0) is Refusal.VM_FLOWS
    budget.release(VM_A, Proto.TCP)
    assert budget.flows(Proto.TCP) == 0
    assert budget.admit(VM_A, Proto.TCP, 0.0) is None
    for _ in range(3):
        budget.release(VM_A, Proto.TCP)
        budget.release(VM_A, Proto.UDP)
        budget.release(VM_B, Proto.TCP)  # unknown VM
    assert budget.flows() == 0
    assert budget.vm_flows(VM_A, Proto.TCP) == 0


def test_udp_eviction_at_cap() -> None:
    budget = FlowBudget(NatLimits(udp_per_vm=2))
    for _ in range(2):
        assert budget.admit(VM_A, Proto.UDP, 0.0) is None
    assert budget.at_cap(VM_A, Proto.UDP)
    budget.release(VM_A, Proto.UDP)  # the driver evicts the least recently used flow
    assert budget.admit(VM_A, Proto.UDP, 0.0) is None
    assert budget.vm_flows(VM_A, Proto.UDP) == 2
    assert not budget.refusals


def test_global_cap() -> None:
    budget = FlowBudget(NatLimits(global_flows=5))
    vms = [("lan", f"10.0.2.{n}") for n in range(10, 20)]
    for vm in vms[:5]:
        assert budget.admit(vm, Proto.UDP, 0.0) is None
    assert budget.admit(vms[5], Proto.TCP, 0.0) is Refusal.GLOBAL_FLOWS
    assert budget.admit(vms[0], Proto.ICMP, 0.0) is Refusal.GLOBAL_FLOWS
    assert budget.refusals["global_flows"] == 2
    budget.release(vms[2], Proto.UDP)
    assert budget.admit(vms[5], Proto.TCP, 0.0) is None
    assert budget.flows() == 5


def test_new_flow_rate_refuses_then_refills() -> None:
    budget = FlowBudget(NatLimits(new_flows_per_second=10.0, new_flows_burst=5))
    results = [budget.admit(VM_A, Proto.UDP, 100.0) for _ in range(6)]
    assert results == [None] * 5 + [Refusal.NEW_FLOW_RATE]
    assert budget.admit(VM_B, Proto.UDP, 100.0) is None  # per VM
    assert budget.admit(VM_A, Proto.UDP, 100.05) is Refusal.NEW_FLOW_RATE
    assert budget.admit(VM_A, Proto.UDP, 100.1) is None  # one token per 0.1 s
    assert budget.admit(VM_A, Proto.UDP, 100.1) is Refusal.NEW_FLOW_RATE
    assert budget.refusals["new_flow_rate"] == 3
    assert budget.vm_flows(VM_A, Proto.UDP) == 6


def test_a_flow_refused_by_a_cap_costs_no_token() -> None:
    budget = FlowBudget(NatLimits(tcp_per_vm=1, new_flows_per_second=1.0, new_flows_burst=2))
    assert budget.admit(VM_A, Proto.TCP, 0.0) is None  # token 1
    for _ in range(10):
        assert budget.admit(VM_A, Proto.TCP, 0.0) is Refusal.VM_FLOWS
    assert budget.admit(VM_A, Proto.UDP, 0.0) is None  # token 2 was still there
    assert budget.admit(VM_A, Proto.ICMP, 0.0) is Refusal.NEW_FLOW_RATE


def test_closing_flows_does_not_reset_the_rate() -> None:
    budget = FlowBudget(NatLimits(new_flows_per_second=1.0, new_flows_burst=3))
    for _ in range(3):
        assert budget.admit(VM_A, Proto.UDP, 0.0) is None
        budget.release(VM_A, Proto.UDP)
    assert budget.admit(VM_A, Proto.UDP, 0.0) is Refusal.NEW_FLOW_RATE


def test_half_open_cap() -> None:
    budget = FlowBudget(NatLimits(tcp_syn_per_vm=3))
    assert [budget.half_open(VM_A, +1) for _ in range(4)] == [True, True, True, False]
    assert budget.vm_half_open(VM_A) == 3
    assert budget.refusals["half_open"] == 1
    assert budget.half_open(VM_B, +1)  # per VM
    assert budget.half_open(VM_A, -1)
    assert budget.half_open(VM_A, +1)
    for _ in range(10):
        assert budget.half_open(VM_A, -1)
    assert budget.vm_half_open(VM_A) == 0
    assert budget.half_open(("nobody", "x"), -1)


def test_byte_buckets_are_per_vm_and_per_direction() -> None:
    limits = NatLimits(bytes_per_second=100_000.0, bytes_burst=100_000)
    budget = FlowBudget(limits)
    assert budget.take_bytes(VM_A, "out", 60_000, 0.0)
    assert not budget.take_bytes(VM_A, "out", 60_000, 0.0)
    assert budget.take_bytes(VM_A, "in", 60_000, 0.0)  # the other direction is separate
    assert budget.take_bytes(VM_B, "out", 60_000, 0.0)  # and so is the other VM
    assert budget.take_bytes(VM_A, "out", 40_000, 0.0)
    assert not budget.take_bytes(VM_A, "out", 1_000, 0.0)
    assert budget.take_bytes(VM_A, "out", 1_000, 0.01)  # 1,000 bytes per 10 ms
    with pytest.raises(ValueError, match="direction"):
        budget.take_bytes(VM_A, "sideways", 1, 0.0)  # type: ignore[arg-type]


def test_idle_vms_are_forgotten_once_rested() -> None:
    budget = FlowBudget(NatLimits(new_flows_per_second=100.0, new_flows_burst=10))
    now = 0.0
    for n in range(10_000):
        vm = ("lan", n)
        assert budget.admit(vm, Proto.UDP, now) is None
        assert budget.take_bytes(vm, "in", 1500, now)
        budget.release(vm, Proto.UDP)
        now += 0.01
        assert budget.tracked_vms <= 20  # only VMs still refilling are remembered
    remaining = budget.tracked_vms
    assert budget.sweep(now + 60.0) == remaining
    assert budget.tracked_vms == 0


def test_a_busy_vm_is_not_forgotten() -> None:
    budget = FlowBudget(NatLimits())
    assert budget.admit(VM_A, Proto.TCP, 0.0) is None
    assert budget.half_open(VM_B, +1)
    assert budget.sweep(1e6) == 0
    for n in range(100):
        budget.admit(("lan", n), Proto.ICMP, 1e6 + n)
    assert budget.vm_flows(VM_A, Proto.TCP) == 1
    assert budget.vm_half_open(VM_B) == 1


def test_sweep_keeps_vms_still_refilling() -> None:
    budget = FlowBudget(NatLimits(new_flows_per_second=1.0, new_flows_burst=10))
    assert budget.admit(VM_A, Proto.UDP, 0.0) is None
    budget.release(VM_A, Proto.UDP)
    assert budget.sweep(0.5) == 0  # forgetting it now would refund the token
    assert budget.tracked_vms == 1
    assert budget.sweep(1.0) == 1
    assert budget.tracked_vms == 0


# --- properties -----------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "release", "syn", "established"]),
        st.integers(0, 3),  # VM
        st.sampled_from(Proto),
        st.floats(0.0, 0.5),  # time step
    ),
    max_size=200,
)


@given(OPS)
def test_counters_stay_within_bounds(ops: list[tuple[str, int, Proto, float]]) -> None:
    limits = NatLimits(
        tcp_per_vm=3,
        udp_per_vm=2,
        icmp_per_vm=1,
        global_flows=7,
        tcp_syn_per_vm=2,
        new_flows_per_second=4.0,
        new_flows_burst=5,
    )
    budget = FlowBudget(limits)
    model: dict[tuple[int, Proto], int] = {}
    now = 0.0
    for op, vm, proto, step in ops:
        now += step
        if op == "admit":
            if budget.admit(vm, proto, now) is None:
                model[vm, proto] = model.get((vm, proto), 0) + 1
        elif op == "release":
            budget.release(vm, proto)
            model[vm, proto] = max(0, model.get((vm, proto), 0) - 1)
        else:
            budget.half_open(vm, +1 if op == "syn" else -1)
        for p in Proto:
            assert budget.flows(p) >= 0
            for v in range(4):
                assert 0 <= budget.vm_flows(v, p) <= limits.per_vm(p)
                assert budget.vm_flows(v, p) == model.get((v, p), 0)
        for v in range(4):
            assert 0 <= budget.vm_half_open(v) <= limits.tcp_syn_per_vm
        assert budget.flows() == sum(budget.flows(p) for p in Proto) <= limits.global_flows
        assert budget.flows() == sum(model.values())
        assert budget.tracked_vms <= 4
