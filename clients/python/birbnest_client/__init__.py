"""Python client for Birb Nest."""
from birbnest_client._version import __version__

__all__ = ["__version__"]
