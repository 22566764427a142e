"""systemd service notification (``sd_notify``) without libsystemd.

With ``Type=notify`` systemd counts the relay as started only once ``READY=1`` arrives (after the
sockets are bound), and with ``WatchdogSec=`` it restarts the relay when ``WATCHDOG=1`` stops
arriving. Each message is one ``AF_UNIX`` datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``
(an absolute path, or ``@name`` in the abstract namespace), so a few lines replace the C library.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. Notification must never take the
relay down: send failures are counted and logged once, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("relay.notify")

MAX_STATUS = 512
"""STATUS= texts are cut to this length (``systemctl status`` shows one line of it)."""


def _target(value: str) -> str | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if it is not one we speak.

    ``@name`` is the abstract namespace (a leading NUL byte); systemd also allows ``vsock:``
    addresses for VMs, which the relay never runs behind.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    """A STATUS= value: newlines would start a new assignment, so they become spaces."""
    return " ".join(text.splitlines())[:MAX_STATUS]


class Notifier:
    """Sends state changes to the service manager named by ``$NOTIFY_SOCKET``.

    Methods return True when the datagram was sent, False when notification is disabled or the
    send failed (``errors`` counts those; the first one is logged).
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.sent = 0
        self.errors = 0
        self._target = _target(address) if address else None
        self._sock: socket.socket | None = None
        self._logged_error = False
        if address and self._target is None:
            log.warning(
                "NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; not notifying",
                address,
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, or a disabled one when not run by systemd."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: the relay is listening."""
        return self.send("READY=1", *self._status(status))

    def watchdog(self) -> bool:
        """The event loop is alive (systemd restarts the relay when these stop)."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: closing sessions, then exiting."""
        return self.send("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        """A one-line state shown by ``systemctl status``."""
        return self.send(*self._status(text))

    def send(self, *assignments: str) -> bool:
        """One datagram of ``KEY=value`` lines; never raises."""
        if self._target is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(data, self._target)
        except OSError as exc:
            self.errors += 1
            if not self._logged_error:
                self._logged_error = True
                log.warning(
                    "cannot notify the service manager at %s: %s (further failures are only "
                    "counted)",
                    self.address,
                    exc.strerror or exc,
                )
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={_one_line(text)}",)


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, as systemd recommends.

    None when there is no watchdog, or when ``$WATCHDOG_PID`` names another process (the
    variables leaked into a child of the supervised process, which must not ping for it).
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            watched = int(pid_text)
        except ValueError:
            return None
        if watched != (os.getpid() if pid is None else pid):
            return None
    return usec / 2_000_000


async def run_watchdog(notifier: Notifier, interval: float | None = None) -> None:
    """Ping the watchdog every ``interval`` seconds (default: from the environment).

    It runs as an ordinary trio task on purpose: if the event loop stalls (a blocking call, a
    busy loop), the pings stop and systemd restarts the relay. Returns at once when there is
    no watchdog to feed.
    """
    if interval is None:
        interval = watchdog_interval()
    if interval is None or not notifier.enabled:
        return
    log.debug("systemd watchdog: pinging every %.3f s", interval)
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
