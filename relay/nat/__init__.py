"""User-space NAT: ICMP, UDP and TCP from the VMs to the outside through host sockets."""
