"""The virtual LANs sessions attach to: a learning switch per LAN name, with its gateway."""
