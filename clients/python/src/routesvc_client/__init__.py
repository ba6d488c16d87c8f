"""A small typed async client for ``routesvc.v1.RouterService``.

::

    async with RouterClient("routesvc.internal:443", api_key=key) as client:  # TLS; insecure=True: plaintext
        decision = await client.route(RouteRequest(chat=user_prompt("hi")), timeout=5)
        async with client.complete(CompleteRequest(chat=user_prompt("hi"))) as stream:
            async for message in stream:  # leaving the block early cancels the call
                ...

Errors are ``grpc.aio.AioRpcError``; ``error_info(error)`` reads routesvc's ``ErrorInfo`` reason,
``retry_info(error)`` how long to wait before trying again. A call given no ``timeout`` gets the
client's default: 30 s, 5 minutes for a whole Complete stream (``default_timeout``,
``default_stream_timeout``; None turns one off).
"""

from routesvc.client import DEFAULT_STREAM_TIMEOUT, DEFAULT_TIMEOUT, CompleteStream
from routesvc_client._client import ERROR_DOMAIN, RouterClient, error_info, retry_info, user_prompt

__all__ = [
    "DEFAULT_STREAM_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ERROR_DOMAIN",
    "CompleteStream",
    "RouterClient",
    "error_info",
    "retry_info",
    "user_prompt",
]
