"""The last real ICMP mode: the system ``ping`` command, run asynchronously per echo request.

Used only when this process may open neither a ping socket nor a raw socket, but a ``ping``
binary (setuid or with file capabilities) can: the old relay's way. The guest gets an echo
reply only when the host's ``ping`` got one from the same destination with a payload of the
same size; it carries the guest's own id, sequence and payload back, and arrives after the
real round trip (plus the cost of starting a process). A host that does not answer gets no
reply: never a fabricated success.
"""

from __future__ import annotations

import shutil
import subprocess

import trio

PROBE_TIMEOUT = 5.0
MAX_PAYLOAD = 1472
"""``ping -s`` beyond this would fragment on a 1500-byte host path: refused instead."""


def find_ping() -> str | None:
    """A ``ping`` binary that can reach loopback from this process, or None."""
    path = shutil.which("ping")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "-n", "-q", "-c", "1", "-W", "1", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if done.returncode == 0 else None


async def ping_once(path: str, dst: str, payload_len: int, wait: int) -> bool:
    """True if ``dst`` answered, within ``wait`` seconds, one echo request with
    ``payload_len`` bytes of payload."""
    command = [path, "-n", "-q", "-c", "1", "-W", str(wait), "-s", str(payload_len), dst]
    with trio.move_on_after(wait + 2):
        done = await trio.run_process(
            command, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
        )
        return done.returncode == 0
    return False
