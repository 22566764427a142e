"""A Linux TAP device read and written without blocking the trio loop.

Opening ``/dev/net/tun`` with TUNSETIFF creates the device (CAP_NET_ADMIN) or attaches to an
existing persistent one its owner may use. The file descriptor stays attached when the device
is moved to another network namespace, so a tool running next to the relay can serve a
namespace, a container or a QEMU guest's bridge. A full device queue drops (counted) instead
of stalling the relay side.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections import Counter

import trio

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFHWADDR = 0x8927
SIOCGIFMTU = 0x8921
IFNAMSIZ = 16
READ_SIZE = 65536


class TapError(OSError):
    """The TAP device cannot be opened or used."""


class TapDevice:
    """One open TAP device."""

    def __init__(self, name: str) -> None:
        if not 0 < len(name.encode()) < IFNAMSIZ:
            raise TapError(errno.EINVAL, f"bad interface name {name!r}")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            request = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
            answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
        except OSError as exc:
            os.close(self.fd)
            hint = " (CAP_NET_ADMIN is needed to create it)" if exc.errno == errno.EPERM else ""
            raise TapError(exc.errno, f"cannot attach TAP {name}: {exc.strerror}{hint}") from None
        self.name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
        self.mac = self._hwaddr()
        self.drops: Counter[str] = Counter()
        self.frames_in = self.frames_out = 0

    def _hwaddr(self) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            answer = fcntl.ioctl(sock, SIOCGIFHWADDR, struct.pack("256s", self.name.encode()))
        return answer[18:24]

    async def read_frame(self) -> bytes:
        """The next frame the kernel sends out of the device."""
        while True:
            try:
                frame = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            self.frames_in += 1
            return frame

    def write_frame(self, frame: bytes) -> None:
        """Hand a frame to the kernel; never blocks (a full queue drops)."""
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self.drops["device_queue_full"] += 1
        except OSError as exc:  # e.g. EIO while the device is down, EINVAL for a runt
            self.drops[errno.errorcode.get(exc.errno or 0, "write_error").lower()] += 1
        else:
            self.frames_out += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
