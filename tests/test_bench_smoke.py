"""``relay bench switch`` and ``relay bench sessions`` end to end with tiny numbers.

These check that the benchmarks work, not how fast or small anything is: every process starts,
talks and reports, and the figures are present, finite and plausible.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from relay.bench.runner import main, parse_args, run


def test_bench_without_subcommand_is_switch() -> None:
    """``scripts/bench --pairs 2`` predates the subcommands and must keep meaning ``switch``."""
    args = parse_args(["--pairs", "3", "--json", "out.json"])
    assert (args.command, args.pairs, args.json_out) == ("switch", 3, "out.json")
    assert parse_args([]).command == "switch"
    assert parse_args(["sessions", "--count", "7"]).count == 7


def test_bench_rejects_unusable_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "--count", "0"]) == 1
    assert "count must be at least 1" in capsys.readouterr().err
    assert main(["switch", "--pairs", "0"]) == 1
    assert "pairs must be at least 1" in capsys.readouterr().err


def test_bench_switch_smoke(tmp_path: Path) -> None:
    out = io.StringIO()
    json_out = tmp_path / "bench.json"
    args = parse_args(
        [
            "switch",
            "--pairs",
            "1",
            "--seconds",
            "1.0",
            "--size",
            "200",
            "--rate",
            "2000",
            "--pings",
            "30",
            "--rounds",
            "1",
            "--json",
            str(json_out),
        ]
    )
    report = run(args, out)

    for side in ("relay", "baseline"):
        throughput, rtt = report[side]["throughput"], report[side]["rtt"]
        assert throughput["frames_sent"] > 0, side
        assert 0 < throughput["frames_received"] <= throughput["frames_sent"], side
        assert throughput["frames_per_s"] > 0, side
        assert throughput["server_cpu_us_per_frame"] > 0, side
        assert 0 <= throughput["loss_pct"] < 100, side
        assert rtt["pings"] > 0, side
        assert rtt["lost"] < rtt["pings"], side
        assert 0 < rtt["p50_ms"] <= rtt["p99_ms"] < 1000, side
    [summary] = report["rounds"]
    assert summary == report["summary"]
    assert summary["frames_per_s_ratio"] > 0
    assert summary["cpu_per_frame_ratio"] > 0
    assert math.isfinite(summary["added_rtt_p50_ms"])
    assert report["median"]["relay_rtt_p99_ms"] == summary["relay_rtt_p99_ms"]

    table = out.getvalue()
    assert "frames/s delivered" in table
    assert "round trip p50" in table
    assert "median" in table
    assert "like for like" in table.lower()

    saved = json.loads(json_out.read_text())
    assert saved["params"] == {
        "pairs": 1,
        "seconds": 1.0,
        "size": 200,
        "rate": 2000,
        "pings": 30,
        "rounds": 1,
    }
    relay_received = report["relay"]["throughput"]["frames_received"]
    assert saved["relay"]["throughput"]["frames_received"] == relay_received


def test_bench_sessions_smoke() -> None:
    out = io.StringIO()
    args = parse_args(["sessions", "--count", "20", "--hold", "1", "--json", "-"])
    report = run(args, out)

    assert report["registered"] == report["relay_registered"] == 20
    assert report["failed"] == report["lost"] == 0
    assert report["worker_exit_codes"] == [0, 0, 0, 0]
    assert report["relay_sessions_seen"] == report["relay_sessions_closed"] == 20
    assert report["relay_sessions_open_after_close"] == 0
    # The relay is a Python process: tens of MB idle, and sessions cost more than nothing.
    assert 10e6 < report["rss_before"] < report["rss_after"] < 1e9
    assert report["rss_delta"] == report["rss_after"] - report["rss_before"]
    assert 0 < report["kib_per_session"] < 10_000
    assert report["rss_limit"] < report["target_rss_at_1000"]
    assert isinstance(report["passed"], bool)
    assert report["setup_seconds"] > 0

    saved = json.loads(out.getvalue())  # --json -: JSON on stdout instead of the table
    assert saved["registered"] == 20
    assert saved["params"]["count"] == 20
