"""Operating the relay: its HTTP side (cert hash, status, metrics, health, dashboard).

``http`` is the trio + h11 server, ``api`` routes requests, ``status`` and ``metrics`` read the
running relay's objects when asked (nothing is counted twice on the frame path).
"""
