"""The DNS forwarder against a real dnsmasq on loopback, and against fake upstreams we control.

Fake upstreams are the test's own sockets on 127.0.0.1/::1, so silence, wrong answers and
truncation happen exactly when the test says; no test waits on a sleep for synchronisation.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest
import trio
from conftest import require_tool, skip_or_fail

from relay.gateway.dns_forwarder import DnsForwarder
from relay.gateway.dns_messages import Upstream, check_query, matches, with_id

GUEST_ID = 0x4242
BIG_TXT = [f"part{i}-" + "x" * 170 for i in range(8)]  # 8 records, ~1.5 kB: needs TCP
HTTPS_RDATA = "0001000001000302683200"  # priority 1, target ".", alpn="h2"


def opt_record(udp_size: int) -> bytes:
    """An EDNS(0) OPT pseudo-record (RFC 6891) advertising ``udp_size``."""
    return b"\x00" + struct.pack("!HHIH", 41, udp_size, 0, 0)


def make_query(name: str, qtype: int, *, ident: int = GUEST_ID, edns: int = 0) -> bytes:
    query = bytes(dpkt.dns.DNS(id=ident, qd=[dpkt.dns.DNS.Q(name=name, type=qtype)]))
    if edns:
        query = query[:10] + b"\x00\x01" + query[12:] + opt_record(edns)
    check_query(query)
    return query


def answer_to(query: bytes, *, ip: str = "192.0.2.99", flags: int = 0x8180) -> bytes:
    """An A answer to ``query`` with its id, as a fake upstream sends it."""
    header = query[:2] + struct.pack("!HHHHH", flags, 1, 1, 0, 0)
    question = query[12 : len(query) - (len(opt_record(0)) if query[11] else 0)]
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return header + question + record


# --- dnsmasq ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dnsmasq:
    upstream: Upstream

    def ask_udp(self, query: bytes, timeout: float = 2) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((self.upstream.host, self.upstream.port))  # so a refusal is reported
            sock.send(query)
            return sock.recv(65535)

    def ask_tcp(self, query: bytes) -> bytes:
        address = (self.upstream.host, self.upstream.port)
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            with sock.makefile("rb") as stream:
                (length,) = struct.unpack("!H", stream.read(2))
                answer: bytes = stream.read(length)
            return answer


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq serves both)."""
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port on 127.0.0.1")


def dnsmasq_command(path: str, port: int) -> list[str]:
    return [
        path,
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        f"--port={port}",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--edns-packet-max=4096",
        "--address=/a.example.test/192.0.2.7",
        "--host-record=dual.example.test,192.0.2.8,2001:db8::8",
        "--mx-host=mx.example.test,mail.example.test,10",
        "--srv-host=_sip._udp.example.test,sip.example.test,5060,1,2",
        # Quotes would be kept literally: argv is not dnsmasq's config-file syntax.
        "--txt-record=txt.example.test,v=spf1 -all,second string",
        f"--dns-rr=svc.example.test,65,{HTTPS_RDATA}",
        *(f"--txt-record=big.example.test,{text}" for text in BIG_TXT),
    ]


def wait_until_answering(server: Dnsmasq, process: subprocess.Popen[bytes]) -> bool:
    """Poll with real queries (bounded) until dnsmasq answers; False if it exited."""
    probe = make_query("a.example.test", 1)
    for _ in range(100):
        if process.poll() is not None:
            return False
        try:
            if matches(probe, server.ask_udp(probe, timeout=0.2)):
                return True
        except OSError:  # refused before it binds, or a timeout
            pass
        try:
            process.wait(0.05)  # paces the loop; returns early only if dnsmasq died
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError("dnsmasq did not answer within the polling budget")


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    path = require_tool("dnsmasq")
    log = tmp_path_factory.mktemp("dnsmasq") / "stderr.log"
    for _ in range(3):  # another process may take the port between free_port() and the bind
        port = free_port()
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                dnsmasq_command(path, port), stdout=subprocess.DEVNULL, stderr=stderr
            )
        server = Dnsmasq(Upstream("127.0.0.1", port))
        try:
            if wait_until_answering(server, process):
                yield server
                return
        finally:
            process.kill()
            process.wait(5)
    raise AssertionError(f"dnsmasq did not start: {Path(log).read_text(errors='replace')}")


# --- fake upstreams ---------------------------------------------------------------------------


@pytest.fixture
async def fake_udp() -> AsyncIterator[trio.socket.SocketType]:
    """A UDP socket on 127.0.0.1 the test answers from (or keeps silent on)."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        yield sock


def upstream_of(sock: trio.socket.SocketType) -> Upstream:
    host, port = sock.getsockname()[:2]
    return Upstream(host, port)


async def closed_port() -> Upstream:
    """A loopback port nobody listens on (UDP and TCP): the kernel refuses at once."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        return upstream_of(sock)


# --- answers from dnsmasq ---------------------------------------------------------------------


async def test_a_record_is_forwarded(dnsmasq: Dnsmasq) -> None:
    forwarder = DnsForwarder([dnsmasq.upstream])
    answer = await forwarder.resolve(make_query("a.example.test", 1))
    parsed = dpkt.dns.DNS(answer)
    assert parsed.id == GUEST_ID
    assert (parsed.qr, parsed.rcode, parsed.tc) == (1, 0, 0)
    assert [(rr.name, rr.type, rr.ip) for rr in parsed.an] == [
        ("a.example.test", 1, socket.inet_aton("192.0.2.7"))
    ]
    assert forwarder.stats["udp_answers"] == 1
    assert forwarder.stats["tcp_fallback"] == 0
    assert forwarder.inflight == 0


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("dual.example.test", 28),
        ("mx.example.test", 15),
        ("_sip._udp.example.test", 33),
        ("txt.example.test", 16),
        ("svc.example.test", 65),
        ("nowhere.example.test", 1),  # REFUSED (dnsmasq has no upstream): passed on as is
    ],
)
async def test_every_record_type_comes_back_byte_for_byte(
    dnsmasq: Dnsmasq, name: str, qtype: int
) -> None:
    query = make_query(name, qtype)
    forwarder = DnsForwarder([dnsmasq.upstream])
    answer = await forwarder.resolve(query)
    assert answer == dnsmasq.ask_udp(query)
    assert forwarder.stats["udp_answers"] == 1
    if qtype == 65:  # dpkt cannot parse HTTPS records: check the raw bytes
        assert answer[:2] == query[:2]
        assert (answer[2] & 0x80, answer[3] & 0x0F) == (0x80, 0)  # QR, NOERROR
        assert answer[6:8] == b"\x00\x01"  # one answer
        assert answer.endswith(bytes.fromhex(HTTPS_RDATA))
        return
    parsed = dpkt.dns.DNS(answer)
    if name != "nowhere.example.test":
        assert parsed.rcode == 0
        assert [rr.type for rr in parsed.an] == [qtype] * len(parsed.an)
        assert parsed.an
    if qtype == 16:
        assert parsed.an[0].text == ["v=spf1 -all", "second string"]


async def test_big_answer_is_fetched_over_tcp(dnsmasq: Dnsmasq) -> None:
    query = make_query("big.example.test", 16)
    assert dpkt.dns.DNS(dnsmasq.ask_udp(query)).tc == 1  # dnsmasq itself truncates over UDP
    forwarder = DnsForwarder([dnsmasq.upstream])
    answer = await forwarder.resolve(query, max_udp_size=65535)
    parsed = dpkt.dns.DNS(answer)
    assert (parsed.id, parsed.tc, parsed.rcode) == (GUEST_ID, 0, 0)
    assert sorted(text for rr in parsed.an for text in rr.text) == sorted(BIG_TXT)
    assert len(answer) > 1400
    assert answer == dnsmasq.ask_tcp(query)
    assert forwarder.stats["tcp_fallback"] == 1
    assert forwarder.stats["tcp_answers"] == 1


async def test_big_answer_is_truncated_for_a_512_byte_guest(dnsmasq: Dnsmasq) -> None:
    query = make_query("big.example.test", 16)
    forwarder = DnsForwarder([dnsmasq.upstream])
    answer = await forwarder.resolve(query, max_udp_size=512)
    parsed = dpkt.dns.DNS(answer)
    assert (parsed.id, parsed.tc, parsed.qr) == (GUEST_ID, 1, 1)
    assert [(q.name, q.type) for q in parsed.qd] == [("big.example.test", 16)]
    assert (parsed.an, parsed.ns, parsed.ar) == ([], [], [])
    assert len(answer) <= 512
    assert forwarder.stats["tcp_fallback"] == 1
    assert forwarder.stats["truncated"] == 1


async def test_edns_query_gets_the_big_answer_over_udp(dnsmasq: Dnsmasq) -> None:
    query = make_query("big.example.test", 16, edns=4096)
    forwarder = DnsForwarder([dnsmasq.upstream])
    answer = await forwarder.resolve(query, max_udp_size=4096)
    parsed = dpkt.dns.DNS(answer)
    assert parsed.tc == 0
    assert sorted(text for rr in parsed.an for text in rr.text) == sorted(BIG_TXT)
    assert forwarder.stats["tcp_fallback"] == 0
    assert forwarder.stats["udp_answers"] == 1


# --- failing upstreams ------------------------------------------------------------------------


async def test_silent_upstream_is_skipped_after_the_timeout(
    dnsmasq: Dnsmasq, fake_udp: trio.socket.SocketType
) -> None:
    query = make_query("a.example.test", 1)
    forwarder = DnsForwarder([upstream_of(fake_udp), dnsmasq.upstream], timeout=0.3, attempts=1)
    answer = await forwarder.resolve(query)
    assert dpkt.dns.DNS(answer).an[0].ip == socket.inet_aton("192.0.2.7")
    assert forwarder.stats["timeouts"] == 1
    assert forwarder.stats["udp_answers"] == 1
    # The silent upstream did get the query, with the question intact.
    with trio.fail_after(1):  # already queued: returns at once
        received = await fake_udp.recv(65535)
    assert matches(received, with_id(answer, check_query(received)))


async def test_refusing_upstream_is_skipped_at_once(dnsmasq: Dnsmasq) -> None:
    forwarder = DnsForwarder([await closed_port(), dnsmasq.upstream], timeout=5, attempts=1)
    with trio.fail_after(2):  # far below the 5 s timeout: the ICMP error ends the wait
        answer = await forwarder.resolve(make_query("a.example.test", 1))
    assert dpkt.dns.DNS(answer).rcode == 0
    assert forwarder.stats["udp_errors"] == 1
    assert forwarder.stats["timeouts"] == 0


async def test_all_upstreams_dead_gives_servfail_quickly() -> None:
    with (
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one,
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two,
    ):
        await one.bind(("127.0.0.1", 0))
        await two.bind(("127.0.0.1", 0))
        forwarder = DnsForwarder([upstream_of(one), upstream_of(two)], timeout=0.1, attempts=2)
        query = make_query("a.example.test", 1)
        start = trio.current_time()
        answer = await forwarder.resolve(query)
        elapsed = trio.current_time() - start
    parsed = dpkt.dns.DNS(answer)
    assert (parsed.id, parsed.qr, parsed.rcode, parsed.an) == (GUEST_ID, 1, 2, [])
    assert matches(query, answer)
    assert forwarder.stats["timeouts"] == 4  # 2 attempts x 2 upstreams
    assert forwarder.stats["servfail"] == 1
    assert 0.4 <= elapsed < 2.0


async def test_no_upstreams_gives_servfail() -> None:
    forwarder = DnsForwarder([])
    answer = await forwarder.resolve(make_query("a.example.test", 1))
    assert dpkt.dns.DNS(answer).rcode == 2
    assert forwarder.stats["servfail"] == 1


async def test_mismatched_answers_are_ignored(fake_udp: trio.socket.SocketType) -> None:
    forwarder = DnsForwarder([upstream_of(fake_udp)], timeout=2)
    query = make_query("fake.example.test", 1)
    right: list[bytes] = []

    async def upstream() -> None:
        sent, address = await fake_udp.recvfrom(65535)
        other_question = make_query("other.example.test", 1, ident=check_query(sent))
        for junk in (
            with_id(answer_to(sent), check_query(sent) ^ 0x8000),  # wrong id
            answer_to(other_question),  # right id, wrong question
            answer_to(sent, flags=0x0100),  # QR not set
            b"\x00\x01\x02",
        ):
            await fake_udp.sendto(junk, address)
        right.append(answer_to(sent, ip="192.0.2.55"))
        await fake_udp.sendto(right[0], address)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        answer = await forwarder.resolve(query)
    assert answer == with_id(right[0], GUEST_ID)
    assert dpkt.dns.DNS(answer).an[0].ip == socket.inet_aton("192.0.2.55")
    assert forwarder.stats["mismatched"] == 4
    assert forwarder.stats["udp_answers"] == 1


async def test_each_query_uses_a_fresh_random_port_and_id(
    fake_udp: trio.socket.SocketType,
) -> None:
    forwarder = DnsForwarder([upstream_of(fake_udp)])
    seen: list[tuple[int, int]] = []

    async def upstream() -> None:
        for _ in range(4):
            sent, address = await fake_udp.recvfrom(65535)
            seen.append((address[1], check_query(sent)))
            await fake_udp.sendto(answer_to(sent), address)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        for _ in range(4):
            answer = await forwarder.resolve(make_query("a.example.test", 1))
            assert dpkt.dns.DNS(answer).id == GUEST_ID
    ports = {port for port, _ in seen}
    ids = {ident for _, ident in seen}
    assert len(ports) >= 3  # random ephemeral ports: 4 equal draws of ~28000 would be a bug
    assert len(ids) >= 3


@pytest.mark.parametrize("tcp_behaviour", ["refused", "closes_early", "wrong_id"])
async def test_truncated_answer_is_kept_when_tcp_fails(
    fake_udp: trio.socket.SocketType, tcp_behaviour: str
) -> None:
    """TC=1 over UDP, and then TCP fails: the guest gets the TC=1 answer, not SERVFAIL."""
    upstream = upstream_of(fake_udp)
    forwarder = DnsForwarder([upstream], timeout=1, attempts=1)
    query = make_query("big.example.test", 1)

    async def udp_side() -> None:
        sent, address = await fake_udp.recvfrom(65535)
        await fake_udp.sendto(answer_to(sent, flags=0x8380), address)  # TC=1

    async def tcp_side(stream: trio.SocketStream) -> None:
        async with stream:
            length = int.from_bytes(await stream.receive_some(2), "big")
            sent = b""
            while len(sent) < length:
                sent += await stream.receive_some(length - len(sent))
            reply = answer_to(sent)
            if tcp_behaviour == "wrong_id":
                reply = with_id(reply, check_query(sent) ^ 1)
            framed = struct.pack("!H", len(reply)) + reply
            if tcp_behaviour == "closes_early":
                framed = framed[:20]
            await stream.send_all(framed)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(udp_side)
        if tcp_behaviour != "refused":
            listeners = await trio.open_tcp_listeners(upstream.port, host=upstream.host)
            await nursery.start(trio.serve_listeners, tcp_side, listeners)
        answer = await forwarder.resolve(query, max_udp_size=4096)
        nursery.cancel_scope.cancel()
    parsed = dpkt.dns.DNS(answer)
    assert (parsed.id, parsed.tc, parsed.rcode) == (GUEST_ID, 1, 0)
    assert forwarder.stats["tcp_fallback"] == 1
    assert forwarder.stats["tcp_errors"] == 1
    assert forwarder.stats["partial_answers"] == 1
    assert forwarder.stats["mismatched"] == (1 if tcp_behaviour == "wrong_id" else 0)


async def test_ipv6_upstream() -> None:
    try:
        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        await sock.bind(("::1", 0))
    except OSError as exc:
        skip_or_fail(f"no IPv6 loopback: {exc}")
    with sock:
        forwarder = DnsForwarder([upstream_of(sock)])

        async def upstream() -> None:
            sent, address = await sock.recvfrom(65535)
            await sock.sendto(answer_to(sent), address)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            answer = await forwarder.resolve(make_query("a.example.test", 1))
    assert dpkt.dns.DNS(answer).an[0].ip == socket.inet_aton("192.0.2.99")
    assert forwarder.stats["udp_answers"] == 1


# --- concurrency ------------------------------------------------------------------------------


async def test_inflight_and_busy_follow_running_queries(fake_udp: trio.socket.SocketType) -> None:
    forwarder = DnsForwarder([upstream_of(fake_udp)], max_inflight=3)
    release = trio.Event()
    arrivals_in, arrivals_out = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](10)
    answers: list[bytes] = []
    all_answered = trio.Event()

    async def upstream() -> None:
        while True:
            await arrivals_in.send(await fake_udp.recvfrom(65535))

    async def ask(name: str) -> None:
        answers.append(await forwarder.resolve(make_query(name, 1)))
        if len(answers) == 3:
            all_answered.set()

    async def answer_all(pending: list[tuple[bytes, tuple[str, int]]]) -> None:
        await release.wait()
        for sent, address in pending:
            await fake_udp.sendto(answer_to(sent), address)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        pending: list[tuple[bytes, tuple[str, int]]] = []
        for count, name in enumerate(["one.test", "two.test", "three.test"], start=1):
            nursery.start_soon(ask, name)
            pending.append(await arrivals_out.receive())  # the query is waiting upstream
            assert forwarder.inflight == count
            assert forwarder.busy() == (count == 3)
        nursery.start_soon(answer_all, pending)
        release.set()
        with trio.fail_after(5):
            await all_answered.wait()
        nursery.cancel_scope.cancel()
    assert forwarder.inflight == 0
    assert not forwarder.busy()
    assert sorted(dpkt.dns.DNS(a).qd[0].name for a in answers) == [
        "one.test",
        "three.test",
        "two.test",
    ]


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        DnsForwarder([], timeout=0)
    with pytest.raises(ValueError, match="attempts"):
        DnsForwarder([], attempts=0)
    with pytest.raises(ValueError, match="max_inflight"):
        DnsForwarder([], max_inflight=0)
