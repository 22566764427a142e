"""The virtual LAN sessions attach to. For now a flooding hub per WebTransport path."""
