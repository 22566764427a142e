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
from relay.tap.device import TapDevice
from relay.wire.messages import Assigned

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
    """Carry frames between ``device`` and the relay until cancelled."""
    delay = settings.backoff_min
    while True:
        try:
            if await _one_session(device, settings, on_registered):
                delay = settings.backoff_min
        except* (ClientError, OSError, trio.TooSlowError) as group:
            exc = group.exceptions[0]
            log.warning("%s: %s", settings.url, exc or type(exc).__name__)
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
            on_registered(assigned)
            nursery.start_soon(_device_to_relay, device, client)
            nursery.start_soon(_relay_to_device, device, client)
            nursery.start_soon(_heartbeats, client, settings.heartbeat_interval)
            await client.closed.wait()
            log.warning("session ended: %s", client.close_reason)
            return True
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
            nursery.cancel_scope.cancel()


async def _device_to_relay(device: TapDevice, client: RelayClient) -> None:
    while True:
        frame = await device.read_frame()
        if not MIN_FRAME <= len(frame) <= MAX_FRAME:
            device.drops["frame_size"] += 1
            continue
        try:
            client.send_frame(frame)
        except ClientError:
            return


async def _relay_to_device(device: TapDevice, client: RelayClient) -> None:
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
