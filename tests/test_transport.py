"""The relay over real UDP sockets on loopback, with the Python client."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any

import pytest
import trio
import trio.lowlevel
from aioquic.quic.packet import encode_quic_version_negotiation
from conftest import StartRelay, relay_url

from relay.bench.lossy import LossyForwarder
from relay.client import REGISTER_RESEND, ClientError, RelayClient, connect, random_mac
from relay.packets import build
from relay.quic.connection import QuicPeer
from relay.server import Listening
from relay.session.service import BavySession
from relay.wire.messages import Heartbeat, Register

BROADCAST = b"\xff" * 6


def frame(src: RelayClient, dst: bytes = BROADCAST, size: int = 64, fill: int = 0) -> bytes:
    """A UDP frame of ``size`` bytes from a registered client's MAC and address (anything
    else is dropped by port security)."""
    assert src.mac is not None and src.assigned is not None
    body = bytes((fill + i * 7) & 0xFF for i in range(size - 42))
    return build.udp_frame(dst, src.mac, src.assigned.ip.packed, b"\x0a\x00\x02\xff", 9, 9, body)


async def registered_pair(
    nursery: trio.Nursery, relay: Listening, path: str = "/"
) -> tuple[RelayClient, bytes, RelayClient, bytes]:
    """Two clients registered on one LAN, with their MACs."""
    url, cert_hash = relay_url(relay, path), relay.identity.hash_hex
    a = await connect(nursery, url, cert_hash=cert_hash)
    b = await connect(nursery, url, cert_hash=cert_hash)
    mac_a, mac_b = random_mac(), random_mac()
    await a.register(mac_a)
    await b.register(mac_b)
    return a, mac_a, b, mac_b


def relay_side_session(relay: Listening, mac: bytes) -> tuple[QuicPeer, int]:
    """The relay's connection and stream id carrying the session registered with ``mac``."""
    for peer in relay.relay.endpoint.peers:
        for stream_id, session in peer.sessions.items():
            if isinstance(session, BavySession) and session.core.mac == mac:
                return peer, stream_id
    raise LookupError(mac.hex())


async def test_register_assigned_bytes_exactly_as_bavy_parses(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_colon)
    mac = bytes([82, 84, 171, 205, 239, 1])
    client.send_datagram(b'\x00{"type":"Register","mac":[82,84,171,205,239,1]}')
    with trio.fail_after(5):
        await client.receive_control()
    assert client.raw_controls[-1] == (
        b'\x00{"type":"Assigned","ip":[10,0,2,254],"gateway":[10,0,2,2],'
        b'"netmask":[255,255,255,0],"dns":[8,8,8,8]}'
    )
    # A repeated Register re-sends the same Assigned.
    client.send_control(Register(mac))
    with trio.fail_after(5):
        await client.receive_control()
    assert client.raw_controls[-1] == client.raw_controls[-2]
    await client.aclose()


async def test_a_lost_register_is_sent_again_until_assigned(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    """Register is a datagram: on a lossy path the first may vanish, and the client sends it
    again (the relay answers a repeat with the same Assigned) instead of waiting for ever."""
    relay = await start_relay()
    forwarder = LossyForwarder(relay.addresses[0], loss=0.0)
    port = await nursery.start(forwarder.run)
    client = await connect(nursery, f"https://127.0.0.1:{port}/", cert_hash=relay.identity.hash_hex)
    forwarder.loss = 1.0  # from here every datagram each way is lost
    registered = trio.Event()

    async def register() -> None:
        await client.register(random_mac())
        registered.set()

    sent_before = client.stats.datagrams_sent
    nursery.start_soon(register)
    with trio.move_on_after(2.5 * REGISTER_RESEND):  # a window of total loss, not a wait
        await registered.wait()
    assert not registered.is_set()
    assert client.stats.datagrams_sent - sent_before == 3  # at 0, 1 and 2 resend periods
    assert forwarder.dropped >= 3
    forwarder.loss = 0.0
    with trio.fail_after(REGISTER_RESEND + 2):
        await registered.wait()
    assert client.assigned is not None
    await client.aclose()


async def test_heartbeat_is_acknowledged(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    relay = await start_relay()
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    await client.register(random_mac())
    client.send_control(Heartbeat())
    with trio.fail_after(5):
        await client.receive_control()
    assert client.raw_controls[-1] == b'\x00{"type":"HeartbeatAck"}'
    assert client.stats.heartbeat_acks == 1
    await client.aclose()


async def test_wrong_certificate_hash_is_refused(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    with pytest.raises(ClientError, match="pinned hash"):
        await connect(nursery, relay_url(relay), cert_hash="00" * 32, handshake_timeout=5)


async def test_frames_flood_to_other_sessions_of_the_same_path_only(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    a, mac_a, b, _mac_b = await registered_pair(nursery, relay, "/lan/one")
    other = await connect(nursery, relay_url(relay, "/lan/two"), cert_hash=relay.identity.hash_hex)
    await other.register(random_mac())
    sent = frame(a, fill=1)
    a.send_frame(sent)
    with trio.fail_after(5):
        assert await b.receive_frame() == sent
    reply = frame(b, dst=mac_a, fill=2)
    b.send_frame(reply)
    with trio.fail_after(5):
        assert await a.receive_frame() == reply
    # Nothing crossed to the other LAN, and nothing echoed back to the sender.
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.WouldBlock):
        other.frames.receive_nowait()
    with pytest.raises(trio.WouldBlock):
        a.frames.receive_nowait()
    assert relay.relay.lans.networks["one"].switch.frames_switched == 2
    for c in (a, b, other):
        await c.aclose()


async def test_full_size_frame_crosses_chunked_both_ways(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    a, mac_a, b, mac_b = await registered_pair(nursery, relay)
    big_ab = frame(a, dst=mac_b, size=1514, fill=3)
    big_ba = frame(b, dst=mac_a, size=1514, fill=4)
    a.send_frame(big_ab)
    b.send_frame(big_ba)
    with trio.fail_after(5):
        assert await b.receive_frame() == big_ab
        assert await a.receive_frame() == big_ba
    assert a.stats.chunks_received == 2 and b.stats.chunks_received == 2
    await a.aclose()
    await b.aclose()


async def test_peer_timeout_closes_the_session_so_the_client_reconnects(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay(peer_timeout=1.0, heartbeat_interval=0.5)
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    mac = random_mac()
    first = await client.register(mac)
    hub = relay.relay.lans.networks["default"]
    assert hub.owners.owner(mac) is not None
    with trio.fail_after(5):
        await client.closed.wait()  # silent client: QUIC stays up, the session does not
    assert client.close_reason == "session closed by relay"
    assert hub.owners.owner(mac) is None
    again = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    assert (await again.register(mac)).ip == first.ip
    await again.aclose()


async def test_registration_timeout_closes(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    relay = await start_relay(registration_timeout=0.5)
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    with trio.fail_after(5):
        await client.closed.wait()
    assert client.close_reason == "session closed by relay"


async def test_reconnect_same_mac_same_ip_and_old_cleanup_spares_the_new_session(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    h, url = relay.identity.hash_hex, relay_url(relay)
    mac = random_mac()
    old = await connect(nursery, url, cert_hash=h)
    first = await old.register(mac)
    new = await connect(nursery, url, cert_hash=h)
    assert (await new.register(mac)).ip == first.ip  # same host: the new session takes over
    with trio.fail_after(5):
        await old.closed.wait()  # the superseded session is closed, not left dangling
    # The new session still owns the MAC and still gets frames after the old one's cleanup.
    hub = relay.relay.lans.networks["default"]
    owner = hub.owners.owner(mac)
    assert owner is not None and owner.mac == mac
    peer = await connect(nursery, url, cert_hash=h)
    peer_mac = random_mac()
    await peer.register(peer_mac)
    sent = frame(peer, dst=mac, fill=9)
    peer.send_frame(sent)
    with trio.fail_after(5):
        assert await new.receive_frame() == sent
    await new.aclose()
    await peer.aclose()


async def test_oversized_datagram_never_stalls_later_ones(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    a, _mac_a, b, mac_b = await registered_pair(nursery, relay)
    # Relay side: push a datagram larger than any packet straight into b's connection.
    peer, stream_id = relay_side_session(relay, mac_b)
    peer.queue_datagram(stream_id, b"\x01" + bytes(1400))
    peer.flush()
    assert peer.queue.drops["oversized"] == 1
    # Client side: the same from a, then ordinary frames still flow both ways.
    a.send_datagram(b"\x01" + bytes(1400))
    assert a._queue.drops["oversized"] == 1
    for i in range(20):
        a.send_frame(frame(a, dst=mac_b, fill=i))
    with trio.fail_after(5):
        got = [await b.receive_frame() for _ in range(20)]
    assert got == [frame(a, dst=mac_b, fill=i) for i in range(20)]
    await a.aclose()
    await b.aclose()


class GetClient(RelayClient):
    def request_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", b"/"),
        ]


class PlainConnectClient(RelayClient):
    def request_headers(self) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in super().request_headers() if k != b":protocol"]


@pytest.mark.parametrize(("client_class", "status"), [(GetClient, 405), (PlainConnectClient, 400)])
async def test_other_requests_get_a_4xx(
    nursery: trio.Nursery, start_relay: StartRelay, client_class: type[RelayClient], status: int
) -> None:
    relay = await start_relay()
    with pytest.raises(ClientError, match=f"HTTP {status}"):
        await connect(
            nursery,
            relay_url(relay),
            cert_hash=relay.identity.hash_hex,
            client_class=client_class,
            handshake_timeout=5,
        )


def junk_initial(size: int = 1200, version: int = 1) -> bytes:
    """A long-header Initial with random contents: parses, never decrypts."""
    dcid, scid = os.urandom(8), os.urandom(8)
    header = b"\xc3" + version.to_bytes(4, "big") + b"\x08" + dcid + b"\x08" + scid + b"\x00"
    length = size - len(header) - 2
    return header + (0x4000 | length).to_bytes(2, "big") + os.urandom(length)


async def test_junk_initial_flood_is_capped_and_answered_with_retry(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay(retry_above=4, max_half_open=8)
    endpoint = relay.relay.endpoint
    host, port = relay.addresses[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0)
        for _ in range(300):
            try:
                sock.sendto(junk_initial(), (host, port))
            except BlockingIOError:
                await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()
        # Half-open state stops growing at the Retry threshold; the rest got stateless Retries.
        assert len(endpoint.peers) <= 4
        assert endpoint.retries_sent > 0
        assert sum(1 for _ in range(64) if _recv_nowait(sock)) > 0
    # A real client still gets in (aioquic's client follows the Retry).
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    assert (await client.register(random_mac())).ip.packed[:3] == bytes([10, 0, 2])
    await client.aclose()


async def test_retry_token_is_honoured_after_the_load_has_passed(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    """The client comes back with its token once the handshake count is below the Retry
    threshold again: the token must still be validated and used (else aioquic's client sees
    the wrong original connection id and aborts)."""
    relay = await start_relay(always_retry=True)
    endpoint = relay.relay.endpoint
    create_token = endpoint._retry.create_token

    def create_token_then_calm_down(*args: Any, **kwargs: Any) -> bytes:
        endpoint.limits = dataclasses.replace(endpoint.limits, always_retry=False)
        return create_token(*args, **kwargs)

    endpoint._retry.create_token = create_token_then_calm_down  # type: ignore[method-assign]
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    await client.register(random_mac())
    assert endpoint.retries_sent == 1
    assert not endpoint.drops["bad_retry_token"]
    await client.aclose()


def _recv_nowait(sock: socket.socket) -> bool:
    try:
        sock.recv(2048)
    except BlockingIOError:
        return False
    return True


async def test_dual_stack_default_serves_ipv4_and_ipv6_and_advertises_wt_max_sessions(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay(binds=("::",))
    port = relay.addresses[0][1]
    for url in (f"https://127.0.0.1:{port}/", f"https://[::1]:{port}/"):
        client = await connect(nursery, url, cert_hash=relay.identity.hash_hex)
        assert (await client.register(random_mac())).ip.packed[:3] == bytes([10, 0, 2])
        assert client._h3 is not None
        settings = client._h3.received_settings or {}
        assert settings.get(0x14E9CD29, 0) >= 1  # WT_MAX_SESSIONS (Safari)
        assert settings.get(0x2B603742) == 1  # ENABLE_WEBTRANSPORT (Chrome, Firefox)
        await client.aclose()


async def test_version_negotiation_rules(start_relay: StartRelay) -> None:
    relay = await start_relay()
    addr = relay.addresses[0]
    endpoint = relay.relay.endpoint
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(addr)
        await sock.send(junk_initial(1200, version=0x1A2A3A4A))  # unknown version: VN answers
        with trio.fail_after(5):
            reply = await sock.recv(2048)
        assert reply[0] & 0x80 and reply[1:5] == bytes(4)  # a Version Negotiation packet
        assert (1).to_bytes(4, "big") in reply[5:]
        # A VN packet (version 0) is never answered, nor a small unknown-version packet.
        await sock.send(
            encode_quic_version_negotiation(
                source_cid=os.urandom(8), destination_cid=os.urandom(8), supported_versions=[1]
            )
        )
        await sock.send(junk_initial(100, version=0x1A2A3A4A))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BlockingIOError):
            sock._sock.recv(2048)
    assert endpoint.drops["version_negotiation"] == 1
    assert endpoint.drops["unsupported_version"] == 2


async def test_pool_exhaustion_sends_error_and_closes_cleanly(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    from ipaddress import IPv4Address

    from relay.lan.addresses import MemoryPool

    relay = await start_relay()
    relay.relay.lans.allocator_factory = lambda _path: MemoryPool(
        IPv4Address("10.0.2.10"), IPv4Address("10.0.2.10")
    )
    url, h = relay_url(relay, "/lan/tiny"), relay.identity.hash_hex
    first = await connect(nursery, url, cert_hash=h)
    assert (await first.register(random_mac())).ip == IPv4Address("10.0.2.10")
    second = await connect(nursery, url, cert_hash=h)
    with trio.fail_after(5), pytest.raises(ClientError, match="IP pool exhausted"):
        await second.register(random_mac())
    assert second.raw_controls[-1] == b'\x00{"type":"Error","message":"IP pool exhausted"}'
    with trio.fail_after(5):
        await second.closed.wait()
    assert second.close_reason == "session closed by relay"
    await first.aclose()


async def test_live_mac_is_not_taken_over_from_another_host(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay(binds=("::",))
    port, h = relay.addresses[0][1], relay.identity.hash_hex
    mac = random_mac()
    owner = await connect(nursery, f"https://127.0.0.1:{port}/", cert_hash=h)
    await owner.register(mac)
    thief = await connect(nursery, f"https://[::1]:{port}/", cert_hash=h)
    with trio.fail_after(5), pytest.raises(ClientError, match="MAC address in use"):
        await thief.register(mac)
    # The owner is untouched.
    owner.heartbeat()
    with trio.fail_after(5):
        await owner.receive_control()
    assert not owner.closed.is_set()
    await owner.aclose()


async def test_idle_networks_give_way_at_the_cap(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    lans = relay.relay.lans
    lans.max_networks = 2
    h = relay.identity.hash_hex
    busy = await connect(nursery, relay_url(relay, "/lan/busy"), cert_hash=h)
    await busy.register(random_mac())
    idle = await connect(nursery, relay_url(relay, "/lan/idle"), cert_hash=h)
    await idle.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the relay has processed the close
    assert not lans.networks["idle"].ports
    newcomer = await connect(nursery, relay_url(relay, "/lan/new"), cert_hash=h)
    await newcomer.register(random_mac())
    assert set(lans.networks) == {"busy", "new"} and lans.evicted == 1
    with pytest.raises(ClientError, match="HTTP 503"):
        await connect(nursery, relay_url(relay, "/lan/another"), cert_hash=h, handshake_timeout=5)
    await busy.aclose()
    await newcomer.aclose()


async def test_bad_datagrams_are_logged_counted_dropped_and_the_session_lives_on(
    nursery: trio.Nursery, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay()
    a, mac_a, b, mac_b = await registered_pair(nursery, relay)
    junk = [b"\x00{not json", b"\x07???", b"\x01short", b"\x02\x00\x01\x05\x02x", b""]
    with caplog.at_level(logging.INFO, logger="relay.session"):
        for _ in range(20):
            for payload in junk:
                a.send_datagram(payload)
            await trio.lowlevel.checkpoint()
        sent = frame(a, dst=mac_b, fill=5)
        a.send_frame(sent)
        with trio.fail_after(5):
            assert await b.receive_frame() == sent  # the session survived all of it
    peer, stream_id = relay_side_session(relay, mac_a)
    session = peer.sessions[stream_id]
    assert isinstance(session, BavySession)
    assert session.core.drops == {
        "bad_control": 20,
        "unknown_type": 20,
        "runt_frame": 20,
        "bad_chunk": 20,
        "empty": 20,
    }
    lines = [r.getMessage() for r in caplog.records if "dropped (" in r.getMessage()]
    assert len(lines) == 5  # one line per reason, not one per datagram
    assert any("dropped (bad_control): control message is not JSON" in line for line in lines)
    await a.aclose()
    await b.aclose()


async def test_a_crashing_connection_is_closed_and_the_relay_lives_on(
    nursery: trio.Nursery, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay()
    original = relay.relay.open_session

    class Boom(RuntimeError):
        pass

    def open_faulty(peer: QuicPeer, stream_id: int, path: str, now: float) -> BavySession | int:
        session = original(peer, stream_id, path, now)
        assert isinstance(session, BavySession)

        async def crash() -> None:
            raise Boom("injected fault")

        session.run = crash  # type: ignore[method-assign]
        return session

    relay.relay.endpoint._sessions = open_faulty
    with caplog.at_level(logging.ERROR, logger="relay.quic"):
        victim = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
        with trio.fail_after(5):
            await victim.closed.wait()
    assert "internal error; closing the connection" in caplog.text
    relay.relay.endpoint._sessions = original
    a, _mac_a, b, mac_b = await registered_pair(nursery, relay)
    sent = frame(a, dst=mac_b, fill=6)
    a.send_frame(sent)
    with trio.fail_after(5):
        assert await b.receive_frame() == sent
    await a.aclose()
    await b.aclose()
