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
    if not path.startswith("/"):
        return None
    parts = path[1:].split("/")
    if parts[-1] == "":
        parts.pop()  # a trailing slash
    match parts:
        case []:
            return LanPath(DEFAULT_LAN, Framing.BAVY)
        case ["raw"]:
            return LanPath(DEFAULT_LAN, Framing.RAW)
        case ["lan", name] if _NAME.fullmatch(name):
            return LanPath(name, Framing.BAVY)
        case ["lan", name, "raw"] if _NAME.fullmatch(name):
            return LanPath(name, Framing.RAW)
    return None
