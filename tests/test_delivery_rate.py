"""The loss response both senders share (:mod:`relay.delivery_rate`), the QUIC congestion
control built on it (:mod:`relay.quic.congestion`) and the TCP sender's SACK scoreboard
(:mod:`relay.nat.tcp_scoreboard`): sans-IO, a float clock."""

from __future__ import annotations

from aioquic.quic.congestion.base import K_MINIMUM_WINDOW, create_congestion_control
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery_rate import QUEUE_GAIN, DeliveryRate
from relay.nat.tcp_scoreboard import Scoreboard
from relay.quic import congestion

MSS = 1200


def steady(rate: DeliveryRate, bytes_per_s: float, rtt: float, rounds: int = 20) -> float:
    """Feed ``rounds`` round trips of a flow delivering ``bytes_per_s``; the time reached."""
    now = 0.0
    for _ in range(rounds):
        rate.on_rtt(rtt)
        now += rtt
        rate.on_delivered(int(bytes_per_s * now), now)
    return now


def test_before_any_measurement_a_loss_halves_the_flight_as_reno_does() -> None:
    assert DeliveryRate().loss_window(40 * MSS, 2 * MSS) == 20 * MSS
    assert DeliveryRate().loss_window(3 * MSS, 2 * MSS) == 2 * MSS


def test_a_flight_the_path_delivers_survives_a_random_loss() -> None:
    """10 MB/s at 2 ms is 20 kB in flight: a loss with that flight keeps it whole."""
    rate = DeliveryRate()
    steady(rate, 10e6, 0.002)
    assert rate.loss_window(20_000, 2 * MSS) == 20_000


def test_a_flight_beyond_twice_the_delivered_product_is_cut_back_to_it() -> None:
    """A queue building: 60 kB in flight where the path delivers 20 kB per round trip."""
    rate = DeliveryRate()
    steady(rate, 10e6, 0.002)
    assert abs(rate.loss_window(60_000, 2 * MSS) - QUEUE_GAIN * 20_000) < 50


def test_the_cut_never_goes_below_renos_half() -> None:
    """A rate measured across an idle spell is low: a loss then costs what Reno's would."""
    rate = DeliveryRate()
    steady(rate, 1000.0, 0.01)
    assert rate.loss_window(50 * MSS, 2 * MSS) == 25 * MSS


def test_the_floor_holds_for_a_tiny_flight() -> None:
    rate = DeliveryRate()
    steady(rate, 1000.0, 0.01)
    assert rate.loss_window(MSS, 2 * MSS) == 2 * MSS


def test_samples_shorter_than_a_round_trip_are_not_taken() -> None:
    """Acks bunched by a scheduler would read as a burst rate the path never had."""
    rate = DeliveryRate()
    rate.on_rtt(0.01)
    rate.on_delivered(0, 0.0)
    rate.on_delivered(1_000_000, 0.0005)  # 2 GB/s over half a millisecond: not a sample
    assert not rate.samples
    rate.on_delivered(1_000_000, 0.02)
    assert list(rate.samples) == [1_000_000 / 0.02]


@given(st.lists(st.tuples(st.floats(1e-4, 1.0), st.integers(0, 10**6)), max_size=50))
def test_the_window_after_a_loss_is_within_floor_and_flight(
    steps: list[tuple[float, int]],
) -> None:
    rate, now, delivered = DeliveryRate(), 0.0, 0
    for gap, more in steps:
        now += gap
        delivered += more
        rate.on_rtt(gap)
        rate.on_delivered(delivered, now)
    for flight in (0, MSS, 10 * MSS, 10**7):
        window = rate.loss_window(flight, 2 * MSS)
        assert 2 * MSS <= window <= max(flight, 2 * MSS)


# -- QUIC congestion control --------------------------------------------------------------------


def packet(number: int, sent_time: float, size: int = MSS) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=3,  # 1-RTT
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=sent_time,
        sent_bytes=size,
    )


def run_rounds(cc: object, rounds: int, per_round: int, rtt: float, start: float = 0.0) -> float:
    """``per_round`` packets sent and acked each round trip; the time reached."""
    now, number = start, 0
    for _ in range(rounds):
        sent = [packet(number + i, now) for i in range(per_round)]
        number += per_round
        for item in sent:
            cc.on_packet_sent(packet=item)  # type: ignore[attr-defined]
        now += rtt
        cc.on_rtt_measurement(now=now, rtt=rtt)  # type: ignore[attr-defined]
        for item in sent:
            cc.on_packet_acked(now=now, packet=item)  # type: ignore[attr-defined]
    return now


def test_the_relay_registers_its_congestion_control_with_aioquic() -> None:
    cc = create_congestion_control(congestion.NAME, max_datagram_size=MSS)
    assert isinstance(cc, congestion.LossTolerantCongestionControl)


def test_quic_random_loss_keeps_the_window_where_reno_halves_it() -> None:
    ours = create_congestion_control(congestion.NAME, max_datagram_size=MSS)
    reno = create_congestion_control("reno", max_datagram_size=MSS)
    before = {}
    for cc in (ours, reno):
        cc.ssthresh = 20 * MSS  # congestion avoidance from here
        cc.congestion_window = 20 * MSS
        now = run_rounds(cc, rounds=12, per_round=20, rtt=0.002)
        before[cc] = cc.congestion_window
        lost = packet(10_000, now)
        cc.on_packet_sent(packet=lost)
        cc.on_packets_lost(now=now + 0.002, packets=[lost])
    assert reno.congestion_window == before[reno] // 2
    assert ours.congestion_window == before[ours] > 20 * MSS


def test_quic_loss_events_in_one_recovery_period_count_once() -> None:
    cc = create_congestion_control(congestion.NAME, max_datagram_size=MSS)
    cc.ssthresh = cc.congestion_window = 200 * MSS  # far beyond what is delivered: cut
    now = run_rounds(cc, rounds=12, per_round=10, rtt=0.002)
    early = [packet(10_000 + i, now) for i in range(2)]
    for item in early:
        cc.on_packet_sent(packet=item)
    cc.on_packets_lost(now=now + 0.003, packets=early[:1])
    after_first = cc.congestion_window
    assert after_first < 200 * MSS
    cc.on_packets_lost(now=now + 0.004, packets=early[1:])  # sent before recovery began
    assert cc.congestion_window == after_first
    assert cc.bytes_in_flight == 0


def test_quic_persistent_congestion_collapses_the_window() -> None:
    cc = create_congestion_control(congestion.NAME, max_datagram_size=MSS)
    run_rounds(cc, rounds=5, per_round=10, rtt=0.002)
    cc.on_persistent_congestion()
    assert cc.congestion_window == K_MINIMUM_WINDOW * MSS


# -- SACK scoreboard ----------------------------------------------------------------------------


def test_scoreboard_merges_blocks_and_lists_the_holes_below_the_highest() -> None:
    board = Scoreboard()
    board.add([(300, 400), (100, 200)])
    board.add([(150, 250), (400, 500)])
    assert board.blocks == [(100, 250), (300, 500)]
    assert board.holes(50) == [(50, 100), (250, 300)]
    assert board.sacked_bytes() == 350
    board.acked(260)
    assert board.blocks == [(300, 500)] and board.holes(260) == [(260, 300)]


def test_pipe_counts_the_tail_and_resent_holes_but_not_lost_ones() -> None:
    """una 0, blocks 100-200 and 300-400, 500 sent: the tail 400-500 is in flight, holes
    0-100 and 200-300 are lost until resent, and a resent hole is in flight again."""
    board = Scoreboard()
    board.add([(100, 200), (300, 400)])
    assert board.pipe(0, 500) == 100
    assert board.next_hole(0, 60) == (0, 60)
    board.resent(0, 60, now=1.0)
    assert board.pipe(0, 500) == 160
    assert board.next_hole(0, 60) == (60, 40)
    board.resent(60, 40, now=1.0)
    assert board.next_hole(0, 60) == (200, 60)
    board.resent(200, 60, now=2.0)
    board.resent(260, 40, now=2.0)
    assert board.next_hole(0, 60) is None
    assert board.pipe(0, 500) == 300
    assert board.resent_at[200] == 2.0
    board.clear()
    assert board.blocks == [] and board.resent_at == {} and board.pipe(0, 500) == 500
