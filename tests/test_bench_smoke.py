"""``relay bench`` end to end with tiny numbers: every process starts, talks and reports.

This checks that the benchmark works, not how fast anything is: the figures only have to be
present, finite and non-zero.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from relay.bench.runner import run_bench


def test_bench_smoke(tmp_path: Path) -> None:
    out = io.StringIO()
    json_out = tmp_path / "bench.json"
    report = run_bench(
        pairs=1, seconds=0.4, size=200, rate=2000, json_out=json_out, pings=30, out=out
    )

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
    ratios = report["ratios"]
    assert ratios["frames_per_s"] > 0
    assert ratios["cpu_per_frame"] > 0
    assert math.isfinite(ratios["added_rtt_p50_ms"])

    table = out.getvalue()
    assert "frames/s delivered" in table
    assert "round trip p50" in table
    assert "like for like" in table.lower()

    saved = json.loads(json_out.read_text())
    assert saved["params"] == {
        "pairs": 1,
        "seconds": 0.4,
        "size": 200,
        "rate": 2000,
        "pings": 30,
        "rounds": 1,
    }
    relay_received = report["relay"]["throughput"]["frames_received"]
    assert saved["relay"]["throughput"]["frames_received"] == relay_received
