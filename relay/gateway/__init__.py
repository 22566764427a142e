"""Gateway services at 10.0.2.2: ARP, ICMP echo, DHCP, DNS."""
