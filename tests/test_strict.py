"""Strict mode really turns every kind of skip into a failure (a real pytest run each)."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SKIPPING = {
    "test_skips": """
import pytest

def test_skipped():
    pytest.skip("no browser here")

@pytest.mark.skipif(True, reason="no root")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

def test_passes():
    pass
""",
    "test_module_skip": """
import pytest
pytest.skip("whole module", allow_module_level=True)

def test_never():
    pass
""",
}


def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: bool, *files: str
) -> pytest.RunResult:
    pytester.makepyfile(**SKIPPING)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    if strict:
        monkeypatch.setenv("RELAY_TEST_STRICT", "1")
    else:
        monkeypatch.delenv("RELAY_TEST_STRICT", raising=False)
    return pytester.runpytest_subprocess("-p", "strict", "-p", "no:cacheprovider", *files)


def test_strict_mode_fails_skips_and_xfails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(pytester, monkeypatch, True, "test_skips.py")
    result.assert_outcomes(passed=1, failed=2, errors=1)  # a skipif fails in setup: an error
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped in strict mode*"])


def test_strict_mode_fails_a_module_skipped_at_collection(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(pytester, monkeypatch, True, "test_module_skip.py")
    result.assert_outcomes(errors=1)
    assert result.ret != 0


def test_without_strict_mode_they_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(pytester, monkeypatch, False)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0
