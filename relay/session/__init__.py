"""One WebTransport session speaking the BAVY protocol: a sans-IO core and its trio driver."""
