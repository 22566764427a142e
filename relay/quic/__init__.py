"""The only package where trio meets aioquic: UDP endpoint, QUIC connections, H3/WebTransport."""
