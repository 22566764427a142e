"""A Linux TAP device read and written without blocking the trio loop.

Opening ``/dev/net/tun`` with TUNSETIFF creates the device (CAP_NET_ADMIN) or attaches to an
existing persistent one its owner may use. The file descriptor stays attached when the device
is moved to another network namespace, so a tool running next to the relay can serve a
namespace, a container or a QEMU guest's bridge. A full device queue drops (counted) instead
of stalling the relay side.

The kernel takes a frame of any size from the file descriptor, whatever the device's MTU, and
hands it to its stack: so frames longer than MTU + 14 are dropped here, as a real NIC would.
The MTU is read per frame because it changes under us (DHCP sets it inside the namespace).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections import Counter
from types import TracebackType

import trio

from relay.logs import RateLimitedLog

log = logging.getLogger("relay.tap")

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNGETDEVNETNS = 0x54E3  # Linux 5.2+: a file descriptor of the device's network namespace
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFHWADDR = 0x8927
SIOCGIFMTU = 0x8921
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
ETH_HEADER = 14
SMALLEST_MTU = 68  # IPv4's minimum: a frame up to 82 bytes fits any device
READ_SIZE = 65536
DEFAULT_MTU = 1500


class TapError(OSError):
    """The TAP device cannot be opened or used."""


class TapGone(TapError):
    """The device was deleted (or its namespace was): nothing is left to serve."""


class TapDevice:
    """One open TAP device; ``drops`` counts frames it refused by reason."""

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
            # Asked of the tun fd itself, so it works wherever the device is moved later.
            self.mac = fcntl.ioctl(self.fd, SIOCGIFHWADDR, bytes(32))[18:24]
        except OSError as exc:
            os.close(self.fd)
            hint = " (CAP_NET_ADMIN is needed to create it)" if exc.errno == errno.EPERM else ""
            raise TapError(exc.errno, f"cannot attach TAP {name}: {exc.strerror}{hint}") from None
        self.name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
        self.drops: Counter[str] = Counter()
        self.frames_in = self.frames_out = 0
        self._mtu = _MtuProbe(self)
        self._drop_log = RateLimitedLog(log)

    @property
    def mtu(self) -> int:
        """The device's MTU now, in whichever namespace it is (the last known if unreadable)."""
        return self._mtu.read()

    def current_name(self) -> str:
        """The name the device has now (it may have been renamed since it was opened)."""
        answer = fcntl.ioctl(self.fd, TUNGETIFF, bytes(IFNAMSIZ + 2))
        return answer[:IFNAMSIZ].rstrip(b"\0").decode()

    async def read_frame(self) -> bytes:
        """The next frame the kernel sends out of the device; :class:`TapGone` once deleted."""
        while True:
            try:
                frame = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                raise TapGone(
                    exc.errno, f"TAP device {self.name} is gone: {exc.strerror}"
                ) from None
            self.frames_in += 1
            return frame

    def write_frame(self, frame: bytes) -> bool:
        """Hand a frame to the kernel; never blocks. False if it was dropped (and counted)."""
        if len(frame) > ETH_HEADER + SMALLEST_MTU and len(frame) > ETH_HEADER + self.mtu:
            self.note_drop(
                "oversized", "frame of %d bytes exceeds MTU %d + 14", len(frame), self._mtu.last
            )
            return False
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self.note_drop("device_queue_full", "the device's queue is full")
            return False
        except OSError as exc:  # EIO while the device is down, EINVAL for a runt, ...
            label = errno.errorcode.get(exc.errno or 0, "write_error").lower()
            self.note_drop(label, "%s", exc.strerror)
            return False
        self.frames_out += 1
        return True

    def note_drop(self, reason: str, message: str, *args: object) -> None:
        """Count a refused frame; log it, at most once per 10 s per reason."""
        self.drops[reason] += 1
        self._drop_log.event(reason, f"{self.name}: dropped ({reason}): {message}", *args)

    def close(self) -> None:
        self._mtu.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


class _MtuProbe:
    """Reads the MTU through a socket in the device's namespace, following it when it moves.

    SIOCGIFMTU works by name in the socket's own namespace; once the device has moved away it
    answers ENODEV, and a new socket is made inside the device's namespace (TUNGETDEVNETNS,
    then setns in a short-lived thread: namespaces are per thread). Without the privilege for
    that, the last MTU read stays in force.
    """

    def __init__(self, device: TapDevice) -> None:
        self._device = device
        self._name = device.name.encode()
        self.last = DEFAULT_MTU
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.read()

    def read(self) -> int:
        if self._sock is None:
            return self.last
        try:
            self.last = self._query(self._sock)
        except OSError as exc:
            if exc.errno != errno.ENODEV or not self._follow():
                self._give_up(exc)
        return self.last

    def _query(self, sock: socket.socket) -> int:
        answer = fcntl.ioctl(sock, SIOCGIFMTU, struct.pack("16si", self._name, 0))
        mtu: int = struct.unpack_from("i", answer, IFNAMSIZ)[0]
        return mtu

    def _follow(self) -> bool:
        """The device moved or was renamed: find it again. False if it cannot be."""
        try:
            self._name = self._device.current_name().encode()
            sock = _socket_in_namespace_of(self._device.fd)
        except OSError:
            return False
        try:
            self.last = self._query(sock)
        except OSError:
            sock.close()
            return False
        self.close()
        self._sock = sock
        return True

    def _give_up(self, exc: OSError) -> None:
        log.warning(
            "cannot read the MTU of %s (%s); assuming %d from now on",
            self._device.name,
            exc.strerror or exc,
            self.last,
        )
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_in_namespace_of(tun_fd: int) -> socket.socket:
    """A UDP socket in the network namespace the TAP device is in now."""
    ns_fd = fcntl.ioctl(tun_fd, TUNGETDEVNETNS)
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def enter_and_open() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            failed.append(OSError(code, os.strerror(code)))
            return
        made.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))  # stays in that netns

    try:
        thread = threading.Thread(target=enter_and_open, name="tap-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(ns_fd)
    if failed:
        raise failed[0]
    if not made:
        raise OSError(errno.EIO, "could not open a socket in the device's namespace")
    return made[0]
