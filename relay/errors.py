"""Exceptions raised by the relay.

The tree::

    RelayError
     ├── ConfigError          a setting the operator gave cannot be used (one-line message)
     │    └── CertificateError  a PEM file is missing, unreadable, mismatched or expired
     └── RemoteProtocolError  the peer sent bytes we cannot use
          └── BadDatagram      an undecodable WebTransport datagram payload

Parsers of untrusted bytes raise only :class:`BadDatagram` (or return a drop reason); the
caller counts the drop and carries on. Anything else escaping a parser is a bug.
"""

from __future__ import annotations


class RelayError(Exception):
    """Root of every exception the relay raises on purpose."""


class ConfigError(RelayError):
    """An operator-supplied setting is unusable; ``str(exc)`` is a one-line explanation."""


class CertificateError(ConfigError):
    """A certificate or key given to the relay cannot be served."""


class RemoteProtocolError(RelayError):
    """The remote side broke the protocol. ``reason`` is a short, bounded counter label."""

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class BadDatagram(RemoteProtocolError):
    """A datagram payload that cannot be decoded; it is counted and dropped."""
