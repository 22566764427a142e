"""The bridge between a TAP device and a relay session, reconnecting for as long as it runs.

It speaks the BAVY protocol through :mod:`relay.client`: Register with the device's MAC, then
frames both ways and a Heartbeat every 15 s, as the VM does. When the session or connection
ends (relay restart, network change), it reconnects with jittered exponential backoff; the
relay's persistent lease gives the same address back, so the kernel side never notices.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import trio

from relay.client import ClientError, RelayClient, connect
from relay.packets.headers import MAX_FRAME, MIN_FRAME
from relay.tap.device import TapDevice, TapGone
from relay.wire.messages import Assigned, format_mac

log = logging.getLogger("relay.tap")


@dataclass(frozen=True, slots=True)
class AttachSettings:
    url: str
    cert_hash: str | None = None
    cafile: str | None = None
    mac: bytes | None = None
    """Register this MAC instead of the device's own."""
    heartbeat_interval: float = 15.0
    handshake_timeout: float = 10.0
    backoff_min: float = 1.0
    backoff_max: float = 30.0


def lan_url(url: str, lan: str | None) -> str:
    """``url`` with ``/lan/<lan>`` as its path, if a LAN is named."""
    if not lan:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/lan/{lan}"))


async def attach(
    device: TapDevice,
    settings: AttachSettings,
    on_registered: Callable[[Assigned], None] = lambda _assigned: None,
) -> None:
    """Carry frames between ``device`` and the relay until cancelled.

    Anything wrong on the relay's side is retried; :class:`TapGone` (the device was deleted)
    ends it, since no reconnection can bring the device back.
    """
    delay = settings.backoff_min
    while True:
        try:
            if await _one_session(device, settings, on_registered):
                delay = settings.backoff_min
        except* TapGone:
            raise
        except* (ClientError, OSError, trio.TooSlowError) as group:
            problem = str(group.exceptions[0]) or type(group.exceptions[0]).__name__
            log.warning(problem if settings.url in problem else f"{settings.url}: {problem}")
        wait = delay * random.uniform(0.5, 1.0)
        log.info("reconnecting to %s in %.1f s", settings.url, wait)
        await trio.sleep(wait)
        delay = min(settings.backoff_max, delay * 2)


async def _one_session(
    device: TapDevice, settings: AttachSettings, on_registered: Callable[[Assigned], None]
) -> bool:
    """One connection's life; True if it got as far as registering."""
    mac = settings.mac or device.mac
    async with trio.open_nursery() as nursery:
        client = await connect(
            nursery,
            settings.url,
            cert_hash=settings.cert_hash,
            cafile=settings.cafile,
            handshake_timeout=settings.handshake_timeout,
        )
        try:
            with trio.fail_after(settings.handshake_timeout):
                assigned = await client.register(mac)
            log.info("registered %s as %s on %s", format_mac(mac), assigned.ip, settings.url)
            on_registered(assigned)
            nursery.start_soon(_device_to_relay, device, client)
            nursery.start_soon(_relay_to_device, device, client)
            nursery.start_soon(_heartbeats, client, settings.heartbeat_interval)
            await client.closed.wait()
            log.warning(
                "session ended: %s (frames from the device %d, to it %d, dropped %s)",
                client.close_reason,
                device.frames_in,
                device.frames_out,
                dict(device.drops) or "none",
            )
            return True
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
            nursery.cancel_scope.cancel()


async def _device_to_relay(device: TapDevice, client: RelayClient) -> None:
    # The kernel sends at most MTU + 14 bytes; a device MTU above 1500 would produce frames
    # the relay refuses, so they are counted here instead.
    while True:
        frame = await device.read_frame()
        if not MIN_FRAME <= len(frame) <= MAX_FRAME:
            device.note_drop("frame_size", "frame of %d bytes is not for the relay", len(frame))
            continue
        try:
            client.send_frame(frame)
        except ClientError:
            return


async def _relay_to_device(device: TapDevice, client: RelayClient) -> None:
    # write_frame drops what exceeds the device's MTU + 14 and what its full queue cannot take.
    while True:
        try:
            frame = await client.receive_frame()
        except ClientError:
            return
        device.write_frame(frame)


async def _heartbeats(client: RelayClient, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        try:
            client.heartbeat()
        except ClientError:
            return
