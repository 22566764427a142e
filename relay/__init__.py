"""WebTransport relay for browser virtual machines."""

__version__ = "0.1.0"
__all__ = ["__version__"]
