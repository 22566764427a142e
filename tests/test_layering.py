"""Sans-IO cores never import trio or sockets: checked in a clean interpreter."""

from __future__ import annotations

import subprocess
import sys

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
]


@pytest.mark.parametrize("module", SANS_IO)
def test_core_does_not_import_trio(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in ('trio', 'socket', 'aioquic') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"{module} pulls in {out}"
