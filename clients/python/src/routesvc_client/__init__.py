"""A small typed async client for ``routesvc.v1.RouterService``.

::

    async with RouterClient("127.0.0.1:50051", api_key=key) as client:
        decision = await client.route(RouteRequest(chat=user_prompt("hi")), timeout=5)
        async with client.complete(CompleteRequest(chat=user_prompt("hi"))) as stream:
            async for message in stream:  # leaving the block early cancels the call
                ...

Errors are ``grpc.aio.AioRpcError``; ``error_info(error)`` reads routesvc's ``ErrorInfo`` reason.
"""

from routesvc.client import CompleteStream
from routesvc_client._client import ERROR_DOMAIN, RouterClient, error_info, user_prompt

__all__ = ["ERROR_DOMAIN", "CompleteStream", "RouterClient", "error_info", "user_prompt"]
