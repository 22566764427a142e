"""Which LAN and which framing a WebTransport path asks for.

``/`` is the default LAN with the BAVY framing; ``/lan/<name>`` is a separate, isolated LAN;
a trailing ``/raw`` selects raw framing (each datagram one bare Ethernet frame, as v86-style
clients send). A query string is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

DEFAULT_LAN = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class Framing(Enum):
    BAVY = "bavy"
    RAW = "raw"


@dataclass(frozen=True, slots=True)
class LanPath:
    lan: str
    framing: Framing


def parse_path(path: str) -> LanPath | None:
    """The LAN a path names, or None if it names none."""
    path = path.split("?", 1)[0]
    parts = path.split("/")
    if not path.startswith("/"):
        return None
    parts = parts[1:]
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    framing = Framing.BAVY
    if parts and parts[-1] == "raw":
        framing = Framing.RAW
        parts.pop()
    if not parts:
        return LanPath(DEFAULT_LAN, framing)
    if len(parts) == 2 and parts[0] == "lan" and _NAME.fullmatch(parts[1]):
        return LanPath(parts[1], framing)
    return None
