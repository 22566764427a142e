"""``relay tap``: a Linux TAP device attached to a relay LAN as one more port."""
