"""Rate-limited logging of drops: a clear line, never a flood."""

from __future__ import annotations

import logging

import pytest

from relay.logs import RateLimitedLog


def test_first_event_logs_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(100):
            limited.event("bad", "dropped %s", "junk")
        now[0] = 10.0
        limited.event("bad", "dropped %s", "junk")
        limited.event("other", "dropped %s", "else")
    assert [r.getMessage() for r in caplog.records] == [
        "dropped junk",
        "dropped junk (and 99 more in the last 10 s)",
        "dropped else",
    ]


def test_keys_are_bounded() -> None:
    limited = RateLimitedLog(logging.getLogger("t"), max_keys=4, clock=lambda: 0.0)
    for i in range(100):
        limited.event(f"k{i}", "x")
    assert len(limited._last) <= 4
