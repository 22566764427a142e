"""``relay bench``: measurements of the relay, each server and client in its own process.

``switch`` (:mod:`relay.bench.switch`): throughput, CPU per frame and round-trip time,
against aioquic's own asyncio WebTransport echo server in the same run. ``sessions``
(:mod:`relay.bench.sessions`): memory with many idle registered sessions. The command line is
:mod:`relay.bench.runner`.
"""
