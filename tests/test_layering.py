"""Sans-IO cores never import trio, aioquic or sockets: checked in a clean interpreter.

dpkt (which the gateway's parsers use) imports ``socket`` itself, for address formatting; for
modules that pull in dpkt, the check is that their own source never imports it.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SANS_IO = [
    "relay.wire",
    "relay.wire.codec",
    "relay.wire.messages",
    "relay.wire.reassembly",
    "relay.session.core",
    "relay.lan.ownership",
    "relay.lan.addresses",
    "relay.quic.datagram_queue",
    "relay.lan.paths",
    "relay.lan.port_security",
    "relay.lan.switch",
    "relay.packets.headers",
    "relay.packets.build",
    "relay.gateway.core",
    "relay.gateway.dhcp",
    "relay.gateway.dns_messages",
    "relay.nat.policy",
    "relay.nat.limits",
    "relay.nat.settings",
    "relay.nat.tcp",
    "relay.nat.tcp_segment",
    "relay.nat.tcp_scoreboard",
    "relay.nat.icmp_echo",
    "relay.delivery_rate",
]


@pytest.mark.parametrize("module", SANS_IO)
def test_core_does_not_import_trio(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "banned = ('trio', 'aioquic') + (() if 'dpkt' in sys.modules else ('socket',))\n"
        "bad = sorted(m for m in banned if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"{module} pulls in {out}"


@pytest.mark.parametrize("module", SANS_IO)
def test_core_source_imports_no_io(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "socket", "aioquic", "sqlite3"}
