"""Figures, target ratios and the table of ``relay bench nat``."""

from __future__ import annotations

import math
from typing import Any

GB = 1e9

MEASUREMENTS: dict[str, str] = {
    "ceiling_up": "client-path ceiling VM1 -> VM2",
    "ceiling_down": "client-path ceiling VM2 -> VM1",
    "nat_up": "NAT TCP VM -> inet",
    "nat_down": "NAT TCP inet -> VM",
    "nat_http": "NAT HTTP download",
    "slirp_up": "slirp4netns VM -> inet",
    "slirp_down": "slirp4netns inet -> VM",
    "slirp_http": "slirp4netns HTTP download",
    "path_up": "NAT TCP via forwarder VM -> inet",
    "path_down": "NAT TCP via forwarder inet -> VM",
    "loss_up": "NAT TCP lossy VM -> inet",
    "loss_down": "NAT TCP lossy inet -> VM",
}
"""Every measurement, in the order it runs and is shown."""

NAT_TRANSFERS = ("nat_up", "nat_down", "nat_http")
SLIRP_TRANSFERS = ("slirp_up", "slirp_down", "slirp_http")


BUSY = 0.85
"""A machine busier than this during a transfer was out of CPU: the figure is CPU-bound."""


def transfer_figures(
    mbit_per_s: float,
    size: int,
    seconds: float,
    wall: float,
    cpu: dict[str, float],
    machine_busy: float = math.nan,
) -> dict[str, Any]:
    """One transfer: goodput, bytes, each measured process's CPU (also per GB moved), and
    the whole machine's busy share of all its CPUs meanwhile (0-1)."""
    gigabytes = size / GB
    return {
        "mbit_per_s": mbit_per_s,
        "bytes": size,
        "seconds": seconds,
        "wall": wall,
        "cpu_s": cpu,
        "cpu_s_per_gb": {k: v / gigabytes if gigabytes else math.nan for k, v in cpu.items()},
        "machine_busy": machine_busy,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _cpu_per_gb(found: dict[str, Any], names: tuple[str, ...], prefixes: tuple[str, ...]) -> float:
    """CPU seconds per GB over several transfers, of the processes whose labels match."""
    if not all(name in found for name in names):
        return math.nan
    cpu = sum(v for n in names for k, v in found[n]["cpu_s"].items() if k.startswith(prefixes))
    return _ratio(cpu, sum(found[n]["bytes"] for n in names) / GB)


def _row(
    name: str, label: str, value: float, target: float | None, needs: list[str], why: str
) -> dict[str, Any]:
    if not math.isfinite(value):
        status = "n/a"
    elif target is None:
        status = "info"
    else:
        status = "PASS" if value >= target else "FAIL"
    row: dict[str, Any] = {"name": name, "label": label, "value": value, "target": target}
    row["status"] = status
    if status == "n/a":
        row["why"] = f"needs {', '.join(needs)}: {why}"
    return row


def ratios(
    found: dict[str, Any], errors: dict[str, str], skipped: list[str]
) -> list[dict[str, Any]]:
    """The targets, from figures of this one run; a missing figure makes its row n/a."""

    def mbit(name: str) -> float:
        return float(found[name]["mbit_per_s"]) if name in found else math.nan

    def why(*names: str) -> str:
        reasons = []
        for n in names:
            if n in errors:
                reasons.append(f"{n} failed")
            elif n in skipped:
                reasons.append(f"{n} skipped")
        return "; ".join(reasons) or "missing"

    rows = []
    for d, arrow in (("up", "VM -> inet"), ("down", "inet -> VM")):
        nat, ceiling = f"nat_{d}", f"ceiling_{d}"
        rows.append(
            _row(
                f"nat_vs_ceiling_{d}",
                f"NAT TCP / client-path ceiling, {arrow}",
                _ratio(mbit(nat), mbit(ceiling)),
                0.9,
                [nat, ceiling],
                why(nat, ceiling),
            )
        )
    for name, label in (("nat_up", "VM -> inet"), ("nat_down", "inet -> VM"), ("nat_http", "HTTP")):
        rows.append(
            _row(
                f"{name}_mbit",
                f"single-guest NAT TCP Mbit/s, {label}",
                mbit(name),
                60.0,
                [name],
                why(name),
            )
        )
    slirp = _cpu_per_gb(found, SLIRP_TRANSFERS, ("slirp",))
    relay = _cpu_per_gb(found, NAT_TRANSFERS, ("relay",))
    relay_tap = _cpu_per_gb(found, NAT_TRANSFERS, ("relay", "tap"))
    nat_needs, slirp_needs = list(NAT_TRANSFERS), list(SLIRP_TRANSFERS)
    both = [*NAT_TRANSFERS, *SLIRP_TRANSFERS]
    for name, label, value, needs in (
        ("relay_cpu_s_per_gb", "relay CPU s/GB (NAT iperf3 + HTTP)", relay, nat_needs),
        ("relay_tap_cpu_s_per_gb", "  relay + tap client CPU s/GB", relay_tap, nat_needs),
        ("slirp_cpu_s_per_gb", "slirp4netns CPU s/GB (iperf3 + HTTP)", slirp, slirp_needs),
        ("relay_cpu_vs_slirp", "relay CPU per GB / slirp4netns's", _ratio(relay, slirp), both),
        (
            "relay_tap_cpu_vs_slirp",
            "  relay + tap client CPU / slirp4netns's",
            _ratio(relay_tap, slirp),
            both,
        ),
    ):
        rows.append(_row(name, label, value, None, needs, why(*needs)))
    for d, arrow in (("up", "VM -> inet"), ("down", "inet -> VM")):
        nat, path, loss = f"nat_{d}", f"path_{d}", f"loss_{d}"
        rows.append(
            _row(
                f"loss_vs_lossfree_{d}",
                f"lossy / same path loss-free, {arrow}",
                _ratio(mbit(loss), mbit(path)),
                0.5,
                [loss, path],
                why(loss, path),
            )
        )
        rows.append(
            _row(
                f"loss_vs_direct_{d}",
                f"  lossy / direct NAT TCP, {arrow}",
                _ratio(mbit(loss), mbit(nat)),
                None,
                [loss, nat],
                why(loss, nat),
            )
        )
    return rows


def _number(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else "-"


def _measurement_line(label: str, m: dict[str, Any]) -> str:
    cpu, per_gb = m["cpu_s"], m["cpu_s_per_gb"]

    def total(source: dict[str, float], prefix: str) -> float:
        picked = [v for k, v in source.items() if k.startswith(prefix)]
        return sum(picked) if picked else math.nan

    busy = m.get("machine_busy")
    busy = math.nan if busy is None else 100 * float(busy)  # JSON null: not measured
    return (
        f"{label:32}{_number(m['mbit_per_s']):>9}{_number(m['bytes'] / 1e6, 0):>7}"
        f"{_number(total(cpu, 'relay'), 2):>7}{_number(total(per_gb, 'relay')):>7}"
        f"{_number(total(cpu, 'tap'), 2):>7}{_number(total(per_gb, 'tap')):>7}"
        f"{_number(total(cpu, 'slirp'), 2):>7}{_number(total(per_gb, 'slirp')):>7}"
        f"{_number(busy, 0):>6}"
    )


def cpu_bound(found: dict[str, Any]) -> list[str]:
    """The measurements during which the machine was out of CPU (busy above :data:`BUSY`)."""
    return [
        name
        for name in MEASUREMENTS
        if name in found
        and found[name].get("machine_busy") is not None
        and math.isfinite(found[name]["machine_busy"])
        and found[name]["machine_busy"] > BUSY
    ]


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: one line per measurement, then the targets."""
    p = report["params"]
    found, errors = report["measurements"], report["errors"]
    lines = [
        f"relay bench nat: iperf3 {p['seconds']} s each way, HTTP {p['http_mb']} MiB, "
        f"loss {100 * p['loss']:g} % each way (seed {p['seed']})",
        f"guest MTU {report['guest_mtu']}, slirp4netns MTU {report['slirp_mtu']}; "
        f"{report['cpus']} CPU(s), load average before {report['load_average_before']:.2f} "
        "(other load skews figures)",
        "",
        f"{'':32}{'Mbit/s':>9}{'MB':>7}{'relay':>7}{'s/GB':>7}{'tap':>7}{'s/GB':>7}"
        f"{'slirp':>7}{'s/GB':>7}{'busy%':>6}",
    ]
    for name, label in MEASUREMENTS.items():
        if name in found:
            lines.append(_measurement_line(label, found[name]))
        elif name in errors:
            lines.append(f"{label:32}  FAILED (see below)")
        elif name in report["skipped"]:
            lines.append(f"{label:32}  skipped")
    lines += ["", f"{'Target (same run)':46}{'value':>10}{'target':>10}{'':>3}status"]
    for row in report["ratios"]:
        target = "" if row["target"] is None else f">= {row['target']:g}"
        digits = 1 if row["name"].endswith(("_mbit", "_per_gb")) else 2
        value = math.nan if row["value"] is None else row["value"]  # JSON null
        lines.append(f"{row['label']:46}{_number(value, digits):>10}{target:>10}   {row['status']}")
    lines += [
        "",
        "* CPU columns: seconds of user + system CPU during the transfer, and per GB moved,",
        "  of the relay, the relay tap client(s) (the ceiling rows count both) and slirp4netns.",
        f"* busy%: the whole machine's CPU use during the transfer, % of all {report['cpus']} "
        "CPU(s);",
        f"  above {100 * BUSY:g} % a figure is CPU-bound (what this box computes, not what "
        "the path carries).",
        "* The ceiling is VM1 -> relay switch -> VM2, two tap clients, no NAT: what the",
        "  tap-client <-> relay path carries at best. It runs three Python processes (relay and",
        "  two tap clients) where the NAT path runs two, so with few CPUs it can fall below the",
        "  NAT figure. Targets are reported, not enforced.",
        "* The lossy rows are iperf3 only, through a UDP forwarder between tap client and",
        "  relay (this kernel has no netem); the forwarder costs CPU of its own, so the loss",
        "  target compares them with the same forwarder at 0 % loss in the same run. Upload",
        "  (VM -> inet) is the guest kernel's congestion control answering the loss;",
        "  download is the relay's.",
    ]
    busy = cpu_bound(found)
    if busy:
        lines.append(f"* CPU-bound (busy > {100 * BUSY:g} %): {', '.join(busy)}.")
    if "loss_up" in found:
        lines.append(f"* Lossy path: {found['loss_up'].get('forwarder', {})} (VM -> inet run).")
    for name, error in errors.items():
        lines.append(f"FAILED {name}: {error}")
    return "\n".join(lines)
