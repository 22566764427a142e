"""WebTransport paths name a LAN and a framing."""

from __future__ import annotations

import pytest

from relay.lan.paths import Framing, LanPath, parse_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", LanPath("default", Framing.BAVY)),
        ("/?x=1", LanPath("default", Framing.BAVY)),
        ("/raw", LanPath("default", Framing.RAW)),
        ("/lan/blue", LanPath("blue", Framing.BAVY)),
        ("/lan/blue/", LanPath("blue", Framing.BAVY)),
        ("/lan/my-lab.2/raw", LanPath("my-lab.2", Framing.RAW)),
        ("/lan/raw", LanPath("raw", Framing.BAVY)),
        ("/lan/raw/raw", LanPath("raw", Framing.RAW)),
        ("/raw/raw", None),
        ("//", None),
        ("/lan/", None),
        ("/lan/a/b", None),
        ("/lan/../raw", None),
        ("/other", None),
        ("lan/x", None),
        ("/lan/" + "x" * 64, None),
    ],
)
def test_paths(path: str, expected: LanPath | None) -> None:
    assert parse_path(path) == expected
