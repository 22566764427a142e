"""``relay bench``'s command line: ``switch`` (the default), ``sessions`` and ``nat``.

``relay bench`` with no subcommand, or with options only (``scripts/bench --pairs 2``), runs
``switch``, as it did before there were subcommands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from relay.bench import nat_report, sessions, switch_report
from relay.bench.nat import NatParams, run_nat
from relay.bench.procs import BenchError, json_safe
from relay.bench.sessions import SessionsParams, run_sessions
from relay.bench.switch import SwitchParams, run_switch
from relay.bench.worker import MAX_SIZE, MIN_SIZE
from relay.wire.codec import CHUNK_THRESHOLD


def emit_report(
    report: dict[str, Any],
    formatter: Callable[[dict[str, Any]], str],
    json_out: str | None,
    out: TextIO | None = None,
) -> None:
    """The table on ``out`` (stdout); with ``json_out`` the full report as JSON there too
    (``-``: JSON instead of the table on stdout, for scripts)."""
    out = out or sys.stdout
    text = json.dumps(json_safe(report), indent=2) + "\n"
    if json_out == "-":
        out.write(text)
        out.flush()
        return
    print(formatter(report), file=out, flush=True)
    if json_out is not None:
        Path(json_out).write_text(text)


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        default=None,
        dest="json_out",
        metavar="FILE",
        help="also write the full results as JSON to FILE ('-': JSON on stdout, no table)",
    )


def _switch_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "switch",
        help="throughput, CPU per frame and latency against aioquic's echo (the default)",
        description="Frames/s, server CPU per frame and round-trip latency of the relay's "
        "switching, against aioquic's asyncio echo server, on 127.0.0.1.",
    )
    defaults = SwitchParams()
    parser.add_argument(
        "--pairs", type=int, default=defaults.pairs, help="sender/receiver pairs (default 2)"
    )
    parser.add_argument(
        "--seconds", type=float, default=defaults.seconds, help="flood duration (default 5)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=defaults.size,
        help=f"frame bytes, {MIN_SIZE}-{MAX_SIZE}; above {CHUNK_THRESHOLD} "
        "frames are chunked (default 1000)",
    )
    parser.add_argument(
        "--rate", type=int, default=None, help="frames/s per sender (default: as fast as possible)"
    )
    parser.add_argument(
        "--pings",
        type=int,
        default=defaults.pings,
        help="round trips measured, for at most --seconds (default 2000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="relay/baseline rounds, alternating; medians are reported (default 3)",
    )
    _json_option(parser)


def _sessions_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "sessions",
        help="relay memory (RSS) with many idle registered sessions",
        description="RSS of the relay before and with COUNT idle registered sessions; "
        "PASS if 1000 sessions fit in 200 MB.",
    )
    defaults = SessionsParams()
    parser.add_argument(
        "--count", type=int, default=defaults.count, help="sessions to open (default 1000)"
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="client processes (default 4)"
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=defaults.hold,
        help="seconds the sessions idle before RSS is read (default 10)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="handshakes in flight per worker (default 20)",
    )
    parser.add_argument(
        "--per-lan",
        type=int,
        default=defaults.per_lan,
        help="sessions per LAN, at most 240 (default 200)",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=defaults.heartbeat,
        help="seconds between a session's heartbeats (default 20)",
    )
    _json_option(parser)


def _nat_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "nat",
        help="TCP through the NAT against the client-path ceiling and slirp4netns (root)",
        description="Goodput and CPU per GB of TCP through the relay's NAT (iperf3 both ways, "
        "an HTTP download), beside the relay's client-path ceiling (two VMs through its "
        "switch), slirp4netns, and the NAT over a lossy client path (iperf3 only), with real "
        "Linux stacks in network namespaces. Needs root and iperf3, curl, udhcpc, "
        "slirp4netns, iproute2; everything it makes is removed on exit. Targets are "
        "reported, not enforced.",
    )
    defaults = NatParams()
    parser.add_argument(
        "--seconds", type=int, default=defaults.seconds, help="iperf3 --time (default 10)"
    )
    parser.add_argument(
        "--http-mb",
        type=int,
        default=defaults.http_mb,
        help="MiB of the file downloaded over HTTP (default 200)",
    )
    parser.add_argument(
        "--loss",
        type=float,
        default=defaults.loss,
        help="share of datagrams dropped each way on the lossy client path (default 0.05)",
    )
    parser.add_argument(
        "--slirp-mtu",
        type=int,
        default=defaults.slirp_mtu,
        help=f"slirp4netns --mtu (default {defaults.slirp_mtu}, its own; the guests' is 936)",
    )
    parser.add_argument("--skip-slirp", action="store_true", help="no slirp4netns comparison")
    parser.add_argument("--skip-loss", action="store_true", help="no lossy-path measurement")
    _json_option(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay bench",
        description="Benchmarks of the relay on 127.0.0.1 (not part of the test run). "
        "Without a subcommand: switch. nat needs root (network namespaces).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{switch,sessions,nat}")
    _switch_parser(sub)
    _sessions_parser(sub)
    _nat_parser(sub)
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> dict[str, Any]:
    """Run the benchmark ``args`` name and print its report."""
    if args.command == "sessions":
        report = run_sessions(
            SessionsParams(
                count=args.count,
                workers=args.workers,
                hold=args.hold,
                concurrency=args.concurrency,
                per_lan=args.per_lan,
                heartbeat=args.heartbeat,
            )
        )
        emit_report(report, sessions.format_report, args.json_out, out)
    elif args.command == "nat":
        report = run_nat(
            NatParams(
                seconds=args.seconds,
                http_mb=args.http_mb,
                loss=args.loss,
                slirp=not args.skip_slirp,
                lossy=not args.skip_loss,
                slirp_mtu=args.slirp_mtu,
            )
        )
        emit_report(report, nat_report.format_report, args.json_out, out)
        if report["errors"]:
            raise BenchError(f"{len(report['errors'])} measurement(s) failed: see the report")
    else:
        report = run_switch(
            SwitchParams(
                pairs=args.pairs,
                seconds=args.seconds,
                size=args.size,
                rate=args.rate,
                pings=args.pings,
                rounds=args.rounds,
            )
        )
        emit_report(report, switch_report.format_report, args.json_out, out)
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options without a subcommand mean ``switch``."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["switch", *argv]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except BenchError as exc:
        print(f"relay bench {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
