"""``relay bench``: the relay's throughput, CPU per frame and round-trip time, measured against
aioquic's own asyncio WebTransport echo server in the same run. See :mod:`relay.bench.runner`.
"""
