"""``relay bench nat``'s pure parts: settings, figures, target rows, the table, stage failures.

No namespaces here: the benchmark itself needs root and minutes (``scripts/bench nat``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from relay.bench.nat import STAGES, Bench, NatParams, busy_share
from relay.bench.nat_report import (
    MEASUREMENTS,
    NAT_TRANSFERS,
    SLIRP_TRANSFERS,
    cpu_bound,
    format_report,
    ratios,
    transfer_figures,
)
from relay.bench.netns import Resources
from relay.bench.procs import BenchError, json_safe
from relay.bench.runner import parse_args

MB = 1_000_000


def figure(mbit: float, megabytes: int, busy: float = 0.5, **cpu: float) -> dict[str, Any]:
    return transfer_figures(mbit, megabytes * MB, 5.0, 5.5, cpu, busy)


def synthetic() -> dict[str, dict[str, Any]]:
    """One run's figures: 1 GB moved through the NAT at 90 CPU-s of relay, through slirp4netns
    at 10 CPU-s, so the CPU ratio is 9."""
    return {
        "ceiling_up": figure(50, 30, 0.95, relay=3.0, tap=2.5, tap2=2.5),
        "ceiling_down": figure(50, 30, 0.95, relay=3.0, tap=2.5, tap2=2.5),
        "nat_up": figure(100, 400, relay=36.0, tap=20.0),
        "nat_down": figure(60, 400, relay=36.0, tap=20.0),
        "nat_http": figure(80, 200, relay=18.0, tap=10.0),
        "slirp_up": figure(800, 400, slirp4netns=4.0),
        "slirp_down": figure(2000, 400, slirp4netns=4.0),
        "slirp_http": figure(1500, 200, slirp4netns=2.0),
        "path_up": figure(80, 50, relay=4.0, tap=3.0, forwarder=1.0),
        "path_down": figure(50, 30, relay=3.0, tap=2.0, forwarder=1.0),
        "loss_up": figure(2.0, 1, relay=0.5, tap=0.4, forwarder=0.1),
        "loss_down": figure(40.0, 25, relay=2.0, tap=1.0, forwarder=0.3),
    }


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def report_of(found: dict[str, Any], errors: dict[str, str], skipped: list[str]) -> dict[str, Any]:
    return {
        "bench": "nat",
        "params": NatParams(seconds=5, http_mb=50).as_dict(),
        "cpus": 2,
        "load_average_before": 0.1,
        "guest_mtu": 936,
        "slirp_mtu": 1500,
        "measurements": found,
        "errors": errors,
        "skipped": skipped,
        "ratios": ratios(found, errors, skipped),
    }


def test_defaults_and_unusable_settings() -> None:
    params = NatParams()
    params.check()
    assert (params.seconds, params.http_mb, params.loss, params.slirp_mtu) == (10, 200, 0.05, 1500)
    assert params.budget() > 10 * params.seconds + params.http_timeout()
    for bad, message in (
        (NatParams(seconds=0), "seconds"),
        (NatParams(seconds=601), "seconds"),
        (NatParams(http_mb=0), "http-mb"),
        (NatParams(loss=1.0), "loss"),
        (NatParams(loss=-0.1), "loss"),
        (NatParams(loss=math.nan), "loss"),
        (NatParams(slirp_mtu=100), "slirp-mtu"),
    ):
        with pytest.raises(BenchError, match=message):
            bad.check()


def test_command_line() -> None:
    args = parse_args(["nat", "--seconds", "3", "--http-mb", "7", "--skip-loss"])
    assert (args.command, args.seconds, args.http_mb, args.skip_loss) == ("nat", 3, 7, True)
    assert (args.skip_slirp, args.loss, args.slirp_mtu) == (False, 0.05, 1500)


def test_stages_cover_every_measurement_in_order() -> None:
    assert [n for names in STAGES.values() for n in names] == list(MEASUREMENTS)
    assert set(NAT_TRANSFERS) | set(SLIRP_TRANSFERS) <= set(MEASUREMENTS)


def test_figures_per_gigabyte_and_busy_share() -> None:
    m = figure(100, 500, 0.9, relay=45.0)
    assert m["cpu_s_per_gb"] == {"relay": pytest.approx(90.0)}
    assert m["machine_busy"] == 0.9
    assert busy_share((100, 1000), (280, 1200)) == pytest.approx(0.9)
    assert math.isnan(busy_share((5, 10), (5, 10)))
    assert cpu_bound({"ceiling_up": m, "nat_up": figure(1, 1, 0.5)}) == ["ceiling_up"]


def test_target_rows_from_one_run() -> None:
    rows = by_name(ratios(synthetic(), {}, []))
    assert rows["nat_vs_ceiling_up"]["value"] == pytest.approx(2.0)
    assert rows["nat_vs_ceiling_up"]["status"] == "PASS"
    assert rows["nat_vs_ceiling_down"]["value"] == pytest.approx(1.2)
    assert rows["nat_up_mbit"]["status"] == "PASS"
    assert rows["nat_down_mbit"]["status"] == "PASS"
    assert rows["relay_cpu_s_per_gb"]["value"] == pytest.approx(90.0)
    assert rows["relay_tap_cpu_s_per_gb"]["value"] == pytest.approx(140.0)
    assert rows["slirp_cpu_s_per_gb"]["value"] == pytest.approx(10.0)
    assert rows["relay_cpu_vs_slirp"]["value"] == pytest.approx(9.0)
    assert rows["relay_cpu_vs_slirp"]["status"] == "info"
    assert rows["loss_vs_lossfree_up"]["value"] == pytest.approx(2 / 80)
    assert rows["loss_vs_lossfree_up"]["status"] == "FAIL"
    assert rows["loss_vs_lossfree_down"]["value"] == pytest.approx(40 / 50)
    assert rows["loss_vs_lossfree_down"]["status"] == "PASS"
    assert rows["loss_vs_direct_down"]["value"] == pytest.approx(40 / 60)
    assert rows["loss_vs_direct_down"]["status"] == "info"


def test_missing_figures_make_their_rows_not_applicable() -> None:
    found = synthetic()
    for name in ("nat_down", "slirp_up", "slirp_down", "slirp_http"):
        del found[name]
    errors = {"nat_down": "iperf3: boom"}
    skipped = ["slirp_up", "slirp_down", "slirp_http"]
    rows = by_name(ratios(found, errors, skipped))
    assert rows["nat_vs_ceiling_up"]["status"] == "PASS"
    assert rows["nat_vs_ceiling_down"]["status"] == "n/a"
    assert "nat_down failed" in rows["nat_vs_ceiling_down"]["why"]
    assert rows["relay_cpu_vs_slirp"]["status"] == "n/a"
    assert "slirp_up skipped" in rows["relay_cpu_vs_slirp"]["why"]
    assert rows["slirp_cpu_s_per_gb"]["status"] == "n/a"
    assert rows["loss_vs_lossfree_down"]["status"] == "PASS"  # its own baseline is there
    assert rows["loss_vs_direct_down"]["status"] == "n/a"
    text = format_report(report_of(found, errors, skipped))
    assert "NAT TCP inet -> VM                FAILED (see below)" in text
    assert "slirp4netns VM -> inet            skipped" in text
    assert "FAILED nat_down: iperf3: boom" in text


def test_table_shows_every_figure_and_target() -> None:
    report = report_of(synthetic(), {}, [])
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith("relay bench nat: iperf3 5 s each way, HTTP 50 MiB, loss 5 %")
    for label in MEASUREMENTS.values():
        assert any(line.startswith(label) for line in lines), label
    nat_up = next(line for line in lines if line.startswith("NAT TCP VM -> inet"))
    figures = "100.0 400 36.00 90.0 20.00 50.0 - - 50"
    assert nat_up.removeprefix("NAT TCP VM -> inet").split() == figures.split()
    target = next(line for line in lines if line.startswith("relay CPU per GB / slirp4netns"))
    assert target.split()[-2:] == ["9.00", "info"]
    assert "CPU-bound (busy > 85 %): ceiling_up, ceiling_down." in text
    assert "FAILED" not in text
    assert max(len(line) for line in lines) <= 100
    # The JSON form (NaN as null) still makes the same table.
    assert format_report(json.loads(json.dumps(json_safe(report)))) == text


async def test_a_stage_that_cannot_be_set_up_fails_only_its_own_measurements(
    tmp_path: Path,
) -> None:
    bench = Bench(NatParams(), Resources(tmp_path))

    async def measured() -> dict[str, Any]:
        return figure(700, 400, slirp4netns=4.0)

    async def slirp() -> None:
        await bench.attempt("slirp_up", None, measured)
        raise BenchError("slirp4netns exited 1")

    await bench.stage("slirp", None, slirp)
    assert list(bench.found) == ["slirp_up"]
    assert bench.errors == {
        "slirp_down": "slirp set-up failed: slirp4netns exited 1",
        "slirp_http": "slirp set-up failed: slirp4netns exited 1",
    }
