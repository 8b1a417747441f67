"""Birb Nest's Python client: :class:`Client` (sync) and :class:`AsyncClient` (asyncio), both on httpx.

    from birbnest_client import Client

    with Client("http://127.0.0.1:8080") as client:
        client.set("greeting", {"text": "hi"}, ttl=60)
        client.get("greeting").value  # {'text': 'hi'}

Errors are :mod:`birbnest_client.errors` (one class per contract code). The Django cache
backend is :class:`birbnest_client.django.BirbNestCache` (``pip install birbnest-client[django]``).
"""

from birbnest_client import errors
from birbnest_client._core import MAX_BATCH_KEYS, USER_AGENT
from birbnest_client._retry import RetryPolicy
from birbnest_client._version import __version__
from birbnest_client.aio import AsyncClient
from birbnest_client.client import Client
from birbnest_client.errors import BirbNestError
from birbnest_client.models import BatchResult, Entry

__all__ = [
    "MAX_BATCH_KEYS",
    "USER_AGENT",
    "AsyncClient",
    "BatchResult",
    "BirbNestError",
    "Client",
    "Entry",
    "RetryPolicy",
    "__version__",
    "errors",
]
