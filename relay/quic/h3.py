"""HTTP/3 with WebTransport, advertising the session-limit settings newer drafts need."""

from __future__ import annotations

from aioquic.h3.connection import H3Connection

WEBTRANSPORT_MAX_SESSIONS_DRAFT07 = 0xC671706A
WT_MAX_SESSIONS = 0x14E9CD29
"""draft-13/14 setting; Safari refuses a server that does not send it (>= 1)."""
MAX_SESSIONS_PER_CONNECTION = 4


class RelayH3Connection(H3Connection):
    """aioquic's H3 with WebTransport on and WT_MAX_SESSIONS advertised."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[WEBTRANSPORT_MAX_SESSIONS_DRAFT07] = MAX_SESSIONS_PER_CONNECTION
        settings[WT_MAX_SESSIONS] = MAX_SESSIONS_PER_CONNECTION
        return settings
