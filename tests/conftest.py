"""Shared fixtures.

Strict mode: CI sets ``RELAY_TEST_STRICT=1``; then a missing browser, tool or privilege that
would skip a test fails it instead, so nothing CI is meant to run is silently skipped.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import settings
from strict import skip_or_fail

from relay.config import RelayConfig
from relay.server import Listening, serve

pytest_plugins = ["pytester"]

# Wall-clock deadlines make property tests flaky on a loaded 2-core CI machine; the examples
# are bounded by size instead. print_blob lets a failure be replayed exactly.
settings.register_profile("relay", deadline=None, print_blob=True)
settings.load_profile("relay")


def require_tool(name: str) -> str:
    """Path of an executable the test needs."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (scripts/test installs it)")
        raise AssertionError("unreachable")
    return path


StartRelay = Callable[..., Awaitable[Listening]]


@pytest.fixture
def start_relay(nursery: trio.Nursery, tmp_path: Path) -> StartRelay:
    """Start an in-process relay on 127.0.0.1 (ephemeral port, leases under ``tmp_path``,
    DNS forwarded to an address nobody answers); keyword args override config."""

    async def start(**overrides: Any) -> Listening:
        settings: dict[str, Any] = {
            "binds": ("127.0.0.1",),
            "port": 0,
            "data_dir": tmp_path / "relay-data",
            "dns_upstreams": ("127.0.0.1:9",),
            "http_port": 0,
        }
        settings.update(overrides)
        config = RelayConfig(**settings)
        listening: Listening = await nursery.start(partial(serve, config, out=io.StringIO()))
        return listening

    return start


def relay_url(listening: Listening, path: str = "/") -> str:
    host, port = listening.addresses[0]
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{port}{path}"
