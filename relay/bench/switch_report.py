"""Figures and the table of ``relay bench switch``, from the workers' raw results."""

from __future__ import annotations

import math
from typing import Any

from relay.bench.procs import median, percentile
from relay.wire.codec import CHUNK_THRESHOLD, MAX_CHUNK_PAYLOAD


def _sum(results: list[dict[str, Any]], key: str) -> float:
    return sum(float(r.get(key, 0)) for r in results)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def throughput_figures(
    results: dict[str, dict[str, Any]], wall: float, server_cpu: float, size: int
) -> dict[str, Any]:
    """Frames/s, loss and CPU per frame from a throughput phase."""
    values = list(results.values())
    senders = [r for r in values if "frames_sent" in r]
    receivers = [r for r in values if "frames_received" in r]
    sent = int(_sum(senders, "frames_sent"))
    received = int(_sum(receivers, "frames_received"))
    queue_drops = int(
        _sum(senders, "sender_queue_drops")
        + _sum(senders, "sender_udp_drops")
        + _sum(senders, "unsent_at_end")
    )
    per_frame = 1 if size <= CHUNK_THRESHOLD else math.ceil(size / MAX_CHUNK_PAYLOAD)
    left_sender = max(0, sent - math.ceil(queue_drops / per_frame))
    duration = max(float(r["send_duration"]) for r in senders) if senders else math.nan
    delays = [d for r in receivers for d in r.get("delays", [])]
    client_cpu = sum(float(r.get("cpu", 0.0)) for r in values)
    return {
        "frames_sent": sent,
        "frames_received": received,
        "datagrams_per_frame": per_frame,
        "sender_queue_drops": queue_drops,
        "sender_stalls": int(_sum(senders, "stalls")),
        "offered_fps": sent / duration,
        "frames_per_s": received / duration,
        "mbit_per_s": received * size * 8 / duration / 1e6,
        "loss_pct": 100.0 * (1 - received / left_sender) if left_sender else math.nan,
        "send_duration": duration,
        "phase_wall": wall,
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_frame": 1e6 * server_cpu / received if received else math.nan,
        "server_cpu_us_per_frame_sent": (
            1e6 * server_cpu / left_sender if left_sender else math.nan
        ),
        "server_cores": server_cpu / wall,
        "frames_per_s_per_core": received / server_cpu if server_cpu else math.nan,
        "clients_cores": client_cpu / wall,
        "one_way_p50_ms": 1000 * percentile(delays, 0.50),
        "one_way_p99_ms": 1000 * percentile(delays, 0.99),
        "receiver_drops": {k: v for r in receivers for k, v in r.get("drops", {}).items() if v},
    }


def rtt_figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Round-trip times; through the relay also the one-way delay ping → relay → pong."""
    pinger = next(r for r in results.values() if "rtts" in r)
    rtts: list[float] = pinger["rtts"]
    found = {
        "pings": pinger["pings"],
        "lost": pinger["lost"],
        "p50_ms": 1000 * percentile(rtts, 0.50),
        "p99_ms": 1000 * percentile(rtts, 0.99),
        "max_ms": 1000 * max(rtts) if rtts else math.nan,
    }
    ponger = next((r for r in results.values() if r.get("role") == "pong"), None)
    if ponger is not None:
        delays: list[float] = ponger.get("delays", [])
        found["one_way_p50_ms"] = 1000 * percentile(delays, 0.50)
        found["one_way_p99_ms"] = 1000 * percentile(delays, 0.99)
    return found


def _without_samples(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("rtts", "delays")}


def figures(
    flood: dict[str, dict[str, Any]],
    flood_wall: float,
    flood_server_cpu: float,
    rtt: dict[str, dict[str, Any]],
    size: int,
) -> dict[str, Any]:
    """One server's figures; the workers' raw reports without their samples."""
    return {
        "throughput": throughput_figures(flood, flood_wall, flood_server_cpu, size),
        "rtt": rtt_figures(rtt),
        "workers": {k: _without_samples(v) for k, v in {**flood, **rtt}.items()},
    }


def round_summary(relay: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one round, relay beside baseline."""
    rt, bt = relay["throughput"], baseline["throughput"]
    rr, br = relay["rtt"], baseline["rtt"]
    return {
        "relay_frames_per_s": rt["frames_per_s"],
        "baseline_frames_per_s": bt["frames_per_s"],
        "frames_per_s_ratio": _ratio(rt["frames_per_s"], bt["frames_per_s"]),
        "relay_cpu_us_per_frame": rt["server_cpu_us_per_frame"],
        "baseline_cpu_us_per_frame": bt["server_cpu_us_per_frame"],
        # Server CPU seconds per frame, relay over baseline: above 1, the relay does more
        # work per frame; its inverse is the ratio of frames per core.
        "cpu_per_frame_ratio": _ratio(rt["server_cpu_us_per_frame"], bt["server_cpu_us_per_frame"]),
        "relay_rtt_p50_ms": rr["p50_ms"],
        "relay_rtt_p99_ms": rr["p99_ms"],
        "baseline_rtt_p50_ms": br["p50_ms"],
        "baseline_rtt_p99_ms": br["p99_ms"],
        "added_rtt_p50_ms": rr["p50_ms"] - br["p50_ms"],
        "added_rtt_p99_ms": rr["p99_ms"] - br["p99_ms"],
        # One pass through each server: client -> relay -> client against
        # client -> echo -> client.
        "added_per_pass_p50_ms": rr.get("one_way_p50_ms", math.nan) - br["p50_ms"],
        "added_per_pass_p99_ms": rr.get("one_way_p99_ms", math.nan) - br["p99_ms"],
    }


def summarise_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The median of every headline figure over the rounds (each figure on its own)."""
    return {key: median([r[key] for r in rounds]) for key in rounds[0]} if rounds else {}


def _ms_pair(p50: float, p99: float) -> str:
    return f"{p50:.2f} / {p99:.2f}"


def _added(p50: float, p99: float) -> str:
    return f"{p50:+.2f} / {p99:+.2f}"


def _detail_lines(report: dict[str, Any]) -> list[str]:
    """The full table of the round shown."""
    r, b = report["relay"], report["baseline"]
    rt, bt, rr, br = r["throughput"], b["throughput"], r["rtt"], b["rtt"]
    summary = report["summary"]
    lines: list[str] = []

    def row(label: str, relay_value: str = "", base_value: str = "", extra: str = "") -> None:
        lines.append(f"{label:34}{relay_value:>18}{base_value:>18}{extra:>12}")

    row("", "relay", "baseline echo", "relay/echo")
    row("Throughput, one sender per pair")
    row(
        "  frames/s delivered",
        f"{rt['frames_per_s']:,.0f}",
        f"{bt['frames_per_s']:,.0f}",
        f"x{summary['frames_per_s_ratio']:.2f}",
    )
    row("  Mbit/s of frames delivered", f"{rt['mbit_per_s']:.1f}", f"{bt['mbit_per_s']:.1f}")
    row(
        "  frames/s offered by the senders",
        f"{rt['offered_fps']:,.0f}",
        f"{bt['offered_fps']:,.0f}",
    )
    row("  loss", f"{rt['loss_pct']:.2f} %", f"{bt['loss_pct']:.2f} %")
    row("  sender-side queue drops", f"{rt['sender_queue_drops']}", f"{bt['sender_queue_drops']}")
    row(
        "  delay under load p50 / p99 ms",
        _ms_pair(rt["one_way_p50_ms"], rt["one_way_p99_ms"]),
        _ms_pair(bt["one_way_p50_ms"], bt["one_way_p99_ms"]),
    )
    row(
        "  server CPU µs per frame delivered",
        f"{rt['server_cpu_us_per_frame']:.1f}",
        f"{bt['server_cpu_us_per_frame']:.1f}",
        f"x{summary['cpu_per_frame_ratio']:.2f}",
    )
    row(
        "    per frame sent (incl. lost)",
        f"{rt['server_cpu_us_per_frame_sent']:.1f}",
        f"{bt['server_cpu_us_per_frame_sent']:.1f}",
    )
    row(
        "  frames per server CPU second",
        f"{rt['frames_per_s_per_core']:,.0f}",
        f"{bt['frames_per_s_per_core']:,.0f}",
    )
    row("  server CPU, cores busy", f"{rt['server_cores']:.2f}", f"{bt['server_cores']:.2f}")
    row(
        "  client processes, cores busy", f"{rt['clients_cores']:.2f}", f"{bt['clients_cores']:.2f}"
    )
    row("Latency, one frame in flight", "", "", "added ms")
    row(
        "  one pass p50 / p99 ms",
        _ms_pair(rr["one_way_p50_ms"], rr["one_way_p99_ms"]),
        _ms_pair(br["p50_ms"], br["p99_ms"]),
        f"{summary['added_per_pass_p50_ms']:+.3f}",
    )
    row(
        "  round trip p50 / p99 ms",
        _ms_pair(rr["p50_ms"], rr["p99_ms"]),
        _ms_pair(br["p50_ms"], br["p99_ms"]),
        f"{summary['added_rtt_p50_ms']:+.3f}",
    )
    row("  pings (lost)", f"{rr['pings']} ({rr['lost']})", f"{br['pings']} ({br['lost']})")
    return lines


def _rounds_lines(report: dict[str, Any]) -> list[str]:
    """One line per round and the medians: the figures to quote."""
    header = (
        f"{'':8}{'frames/s relay':>15}{'echo':>9}{'ratio':>7}"
        f"{'µs/frame relay':>16}{'echo':>7}{'ratio':>7}"
        f"{'RTT p50/p99 ms relay':>22}{'echo':>13}{'added':>17}"
    )
    lines = [header]

    def line(label: str, s: dict[str, float]) -> str:
        return (
            f"{label:8}{s['relay_frames_per_s']:>15,.0f}{s['baseline_frames_per_s']:>9,.0f}"
            f"{s['frames_per_s_ratio']:>7.2f}"
            f"{s['relay_cpu_us_per_frame']:>16.1f}{s['baseline_cpu_us_per_frame']:>7.1f}"
            f"{s['cpu_per_frame_ratio']:>7.2f}"
            f"{_ms_pair(s['relay_rtt_p50_ms'], s['relay_rtt_p99_ms']):>22}"
            f"{_ms_pair(s['baseline_rtt_p50_ms'], s['baseline_rtt_p99_ms']):>13}"
            f"{_added(s['added_rtt_p50_ms'], s['added_rtt_p99_ms']):>17}"
        )

    for i, summary in enumerate(report["rounds"], 1):
        lines.append(line(f"round {i}", summary))
    lines.append(line("median", report["median"]))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: rounds and medians first, then the median round's detail."""
    p = report["params"]
    chunks = report["relay"]["throughput"]["datagrams_per_frame"]
    datagrams = (
        "1 datagram each"
        if chunks == 1
        else f"{chunks} datagrams each: frames above {CHUNK_THRESHOLD} bytes are chunked"
    )
    pacing = f"paced at {p['rate']} frames/s per sender" if p["rate"] else "unpaced"
    lines = [
        f"relay bench switch: {p['pairs']} pair(s) on their own LANs, {p['seconds']:g} s, "
        f"{p['size']}-byte frames ({datagrams}), {pacing}; {p['rounds']} round(s)",
        f"{report['cpus']} CPU(s); load average before the round shown "
        f"{report['load_average_before']:.2f} (other processes' load skews every figure)",
        "",
        *_rounds_lines(report),
        "",
        f"Round {report['shown_round']} in detail (the median round by CPU per frame):",
        *_detail_lines(report),
        "",
        "Like for like: the relay forwards client -> relay -> client, one receive and one",
        "send per frame at the server, as the echo does (client -> echo -> client).",
        "* ratio: relay over echo. µs/frame is server CPU per frame delivered; its ratio is",
        "  the relay's cost per core against the echo's (1.00: as cheap as plain aioquic).",
        "* Loss counts frames that left the senders' own queues; sender-side drops are the",
        "  clients', not the servers'. Delay under load is sender -> receiver (for the echo,",
        "  the full round trip, as sender and receiver are one process).",
        "* One pass: relay A -> relay -> B (one way) against the echo's A -> echo -> A round",
        "  trip. Round trip: the relay's A -> relay -> B -> relay -> A is two passes plus",
        "  B's turnaround, against one echo pass; 'added' is the difference.",
    ]
    rt = report["relay"]["throughput"]
    bt = report["baseline"]["throughput"]
    if rt["receiver_drops"] or bt["receiver_drops"]:
        lines.append(
            f"Receiver-side drops: relay {rt['receiver_drops']}, baseline {bt['receiver_drops']}"
        )
    cpus = report["cpus"] or 0
    for name, found in (("relay", rt), ("baseline", bt)):
        if cpus and found["server_cores"] + found["clients_cores"] > 0.9 * cpus:
            lines.append(
                f"Note: CPUs saturated in the {name} throughput phase (clients compete with "
                "the server)."
            )
    return "\n".join(lines)
