"""Ethernet/ARP/IPv4 bytes: a fast header view for the switch and builders for the gateway."""
