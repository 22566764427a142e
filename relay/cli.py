"""The ``relay`` command: a thin typer shell over :mod:`relay.server` and :mod:`relay.tls`."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import trio
import typer

from relay.config import RelayConfig
from relay.errors import ConfigError
from relay.logs import setup_logging
from relay.server import load_tls, prepare_data_dir
from relay.tls import TlsIdentity

if TYPE_CHECKING:
    from relay.tap.attach import AttachSettings
    from relay.tap.device import TapDevice
    from relay.wire.messages import Assigned

app = typer.Typer(
    help="WebTransport relay for browser virtual machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cert_app = typer.Typer(help="Certificates for WebTransport hash pinning.", no_args_is_help=True)
app.add_typer(cert_app, name="cert")

log = logging.getLogger("relay")


class LogFormatChoice(StrEnum):
    text = "text"
    json = "json"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class IcmpModeChoice(StrEnum):
    auto = "auto"
    socket = "socket"
    raw = "raw"
    command = "command"
    off = "off"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"relay: error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def serve(
    bind: Annotated[
        list[str] | None,
        typer.Option(
            "--bind",
            "-b",
            envvar="RELAY_BIND",
            help="Address to listen on (repeatable). Default: :: (IPv6 and IPv4).",
        ),
    ] = None,
    port: Annotated[int, typer.Option("--port", "-p", envvar="RELAY_PORT")] = 4433,
    cert_pem: Annotated[
        Path | None,
        typer.Option(
            envvar="RELAY_CERT_PEM", help="Certificate chain (PEM). Default: self-signed."
        ),
    ] = None,
    key_pem: Annotated[
        Path | None, typer.Option(envvar="RELAY_KEY_PEM", help="Private key (PEM).")
    ] = None,
    cert_san: Annotated[
        list[str] | None,
        typer.Option(
            envvar="RELAY_CERT_SAN",
            help="Extra DNS name or IP for the self-signed certificate (repeatable).",
        ),
    ] = None,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            envvar="RELAY_HEARTBEAT_INTERVAL",
            help="Seconds between client heartbeats the relay expects.",
        ),
    ] = 30.0,
    peer_timeout: Annotated[
        float,
        typer.Option(
            envvar="RELAY_PEER_TIMEOUT",
            help="Close a session silent for this many seconds (client reconnects).",
        ),
    ] = 150.0,
    data_dir: Annotated[
        Path, typer.Option(envvar="RELAY_DATA_DIR", help="Directory for persistent state.")
    ] = Path("relay-data"),
    http_port: Annotated[
        int | None,
        typer.Option(
            envvar="RELAY_HTTP_PORT",
            help="TCP port for the dashboard and HTTP API. Default: the QUIC port number.",
        ),
    ] = None,
    http_bind: Annotated[
        list[str] | None,
        typer.Option(
            envvar="RELAY_HTTP_BIND",
            help="Address for the HTTP side (repeatable). Default: the --bind addresses.",
        ),
    ] = None,
    no_http: Annotated[
        bool,
        typer.Option("--no-http", envvar="RELAY_NO_HTTP", help="No HTTP side at all."),
    ] = False,
    cert_poll_interval: Annotated[
        float,
        typer.Option(
            envvar=["RELAY_CERT_POLL_INTERVAL", "CERT_POLL_INTERVAL"],
            help="Seconds between checks of the PEM files (reloaded in place when they "
            "change) and of self-signed certificates' age (rotated before expiry).",
        ),
    ] = 60.0,
    dns_upstream: Annotated[
        list[str] | None,
        typer.Option(
            envvar="RELAY_DNS_UPSTREAM",
            help="Resolver (IP or IP:port) the gateway's DNS forwards to (repeatable). "
            "Default: the nameservers in /etc/resolv.conf.",
        ),
    ] = None,
    guest_mtu: Annotated[
        int,
        typer.Option(
            envvar="RELAY_GUEST_MTU",
            help="IP MTU advertised to guests by DHCP (936: every frame fits one datagram).",
        ),
    ] = 936,
    egress_allow: Annotated[
        list[str] | None,
        typer.Option(
            envvar="RELAY_EGRESS_ALLOW",
            help="Let VMs reach CIDR[:ports] (e.g. 192.168.5.0/24:80,443) that the default-deny "
            "egress policy refuses (repeatable; the variable takes a space-separated list).",
        ),
    ] = None,
    egress_deny: Annotated[
        list[str] | None,
        typer.Option(
            envvar="RELAY_EGRESS_DENY",
            help="Refuse CIDR[:ports] to VMs (repeatable); wins over --egress-allow.",
        ),
    ] = None,
    icmp_mode: Annotated[
        IcmpModeChoice,
        typer.Option(
            envvar="RELAY_ICMP_MODE",
            help="How VMs' pings leave: ping sockets, a raw socket, the ping command, or off "
            "(refused); auto picks the first this process may use.",
        ),
    ] = IcmpModeChoice.auto,
    no_nat: Annotated[
        bool,
        typer.Option("--no-nat", envvar="RELAY_NO_NAT", help="No route to the outside at all."),
    ] = False,
    log_level: Annotated[LogLevel, typer.Option(envvar="RELAY_LOG_LEVEL")] = LogLevel.info,
    log_format: Annotated[
        LogFormatChoice, typer.Option(envvar="RELAY_LOG_FORMAT")
    ] = LogFormatChoice.text,
) -> None:
    """Run the relay: WebTransport on UDP; / is the default LAN, /lan/NAME another one."""
    setup_logging(log_level.value, log_format.value)
    try:
        config = RelayConfig(
            binds=tuple(bind or ("::",)),
            port=port,
            cert_pem=cert_pem,
            key_pem=key_pem,
            cert_sans=tuple(cert_san or ()),
            heartbeat_interval=heartbeat_interval,
            peer_timeout=peer_timeout,
            data_dir=data_dir,
            http=not no_http,
            http_port=http_port,
            http_binds=tuple(http_bind or ()),
            cert_poll_interval=cert_poll_interval,
            dns_upstreams=tuple(dns_upstream or ()),
            guest_mtu=guest_mtu,
            nat=not no_nat,
            egress_allow=tuple(egress_allow or ()),
            egress_deny=tuple(egress_deny or ()),
            icmp_mode=icmp_mode.value,
        )
        identity = load_tls(config)
        prepare_data_dir(config)
        trio.run(_serve_until_signal, config, identity)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot listen: {exc.strerror or exc}") from None
    except BaseExceptionGroup as group:
        leaf = _operator_error(group)
        if leaf is None:
            raise
        raise _fail(
            str(leaf)
            if isinstance(leaf, ConfigError)
            else f"cannot listen: {leaf.strerror or leaf}"
        ) from None


def _operator_error(group: BaseExceptionGroup[BaseException]) -> ConfigError | OSError | None:
    """The one configuration or socket error a start-up failure boils down to, if any."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _operator_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, ConfigError | OSError):
            return exc
    return None


async def _serve_until_signal(config: RelayConfig, identity: TlsIdentity) -> None:
    from relay.server import serve as run_relay

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_relay, config, identity=identity))
            async for signum in signals:
                log.info("%s received; closing sessions", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


@cert_app.command("generate")
def cert_generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for cert.pem and key.pem.")],
    days: Annotated[
        float, typer.Option("--days", help="Validity in days (at most 14 for hash pinning).")
    ] = 13.0,
    san: Annotated[
        list[str] | None, typer.Option("--san", help="Extra DNS name or IP (repeatable).")
    ] = None,
) -> None:
    """Write a self-signed ECDSA P-256 certificate and key; print the SHA-256 to pin."""
    from relay.tls import generate_self_signed, write_identity

    try:
        identity = generate_self_signed(tuple(san or ()), days=days)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    cert_path, key_path = write_identity(identity, out)
    typer.echo(f"Certificate: {cert_path}")
    typer.echo(f"Key: {key_path}")
    typer.echo(f"Valid until: {identity.not_after:%Y-%m-%d %H:%M} UTC")
    typer.echo(f"Certificate SHA-256 Hash: {identity.hash_colon}")
    typer.echo(f"Certificate SHA-256 Hash (hex): {identity.hash_hex}")


@cert_app.command("hash")
def cert_hash(file: Annotated[Path, typer.Argument(help="PEM certificate.")]) -> None:
    """Print the SHA-256 of a certificate's DER encoding (what browsers pin)."""
    from relay.tls import hash_of_pem_file

    try:
        typer.echo(hash_of_pem_file(file))
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Benchmark the relay against an aioquic echo baseline (``relay bench --help``)."""
    from relay.bench.runner import main as bench_main

    raise typer.Exit(code=bench_main(list(ctx.args)))


@app.command()
def tap(
    url: Annotated[
        str, typer.Option(envvar="RELAY_URL", help="The relay, e.g. https://relay.example:4433/")
    ],
    cert_hash: Annotated[
        str | None,
        typer.Option(
            envvar="RELAY_CERT_HASH", help="Pin the relay's certificate SHA-256 (hex or aa:bb:..)."
        ),
    ] = None,
    cafile: Annotated[
        Path | None, typer.Option(help="CA bundle to verify the relay (default: system CAs).")
    ] = None,
    dev: Annotated[str, typer.Option(help="TAP device to create or attach to.")] = "tap0",
    lan: Annotated[str | None, typer.Option(help="Join /lan/LAN instead of the default.")] = None,
    mac: Annotated[
        str | None, typer.Option(help="Register this MAC (default: the device's).")
    ] = None,
    log_level: Annotated[LogLevel, typer.Option(envvar="RELAY_LOG_LEVEL")] = LogLevel.info,
    log_format: Annotated[
        LogFormatChoice, typer.Option(envvar="RELAY_LOG_FORMAT")
    ] = LogFormatChoice.text,
) -> None:
    """Attach a Linux TAP device to a relay LAN (a host, namespace or QEMU guest joins it).

    Needs CAP_NET_ADMIN only to create the device. Reconnects until stopped; prints
    ``Attached DEV (MAC) to URL as IP`` each time the relay assigns the address."""
    from urllib.parse import urlsplit

    from relay.client import ClientError, parse_cert_hash
    from relay.tap.attach import AttachSettings, lan_url
    from relay.tap.device import TapDevice, TapGone
    from relay.wire.messages import format_mac, parse_mac

    setup_logging(log_level.value, log_format.value)
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise _fail(f"--url must be https://host:port/, not {url!r}")
    try:
        own_mac = parse_mac(mac) if mac else None
        if own_mac is not None and own_mac[0] & 1:
            raise ValueError(f"--mac {mac} is a multicast address")
        if cert_hash:
            parse_cert_hash(cert_hash)
    except (ValueError, ClientError) as exc:
        raise _fail(str(exc)) from None
    if cafile is not None and not cafile.is_file():
        raise _fail(f"--cafile {cafile} is not a readable file")
    target = lan_url(url, lan)
    settings = AttachSettings(
        target, cert_hash=cert_hash, cafile=str(cafile) if cafile else None, mac=own_mac
    )
    try:
        device = TapDevice(dev)
    except OSError as exc:
        raise _fail(str(exc.strerror or exc)) from None

    def registered(assigned: Assigned) -> None:
        shown = format_mac(settings.mac or device.mac)
        typer.echo(f"Attached {device.name} ({shown}) to {target} as {assigned.ip}")

    try:
        trio.run(_tap_until_signal, device, settings, registered)
    except BaseExceptionGroup as group:
        gone = group.subgroup(TapGone)
        if gone is None:
            raise
        leaf = _first_leaf(gone)
        text = leaf.strerror if isinstance(leaf, OSError) and leaf.strerror else str(leaf)
        typer.echo(f"relay: error: {text}", err=True)
        raise typer.Exit(code=1) from None
    finally:
        device.close()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _tap_until_signal(
    device: TapDevice, settings: AttachSettings, registered: Callable[[Assigned], None]
) -> None:
    from relay.tap.attach import attach

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attach, device, settings, registered)
            async for signum in signals:
                log.info("%s received; detaching", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    app()
