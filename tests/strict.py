"""Strict mode, a pytest plugin: with ``RELAY_TEST_STRICT=1`` (CI) nothing may be skipped.

A missing browser, tool or privilege skips a test on a developer's machine; in CI the same
test must run, so every skip, an xfail included (it would hide a real failure), and a module
skipped at collection all become failures. ``tests/test_strict.py`` checks that they do.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

STRICT = os.environ.get("RELAY_TEST_STRICT") == "1"
MESSAGE = "skipped in strict mode (RELAY_TEST_STRICT=1)"


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it in strict mode (CI)."""
    if STRICT:
        pytest.fail(f"strict mode (RELAY_TEST_STRICT=1): {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{MESSAGE}: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{MESSAGE}: {report.longrepr}"
