"""The REST proxy (DESIGN 3.6): Discord's REST API for any number of clients, under the shared limits.

- `core`: one request, validated and sent through `RatelimitedTransport`; the errors and their codes.
- `rpc`: the AMQP RPC wire format of `@spectacles/proxy` (MessagePack requests, `{status, body}` replies).
- `amqp`: the RPC consumer on RabbitMQ (queue `AMQP_GROUP:AMQP_EVENT`, replies, CANCEL).
- `http`: the HTTP front (`PROXY_HTTP_ADDRESS`, every worker on one port with SO_REUSEPORT).

Each worker process runs both fronts on one `RestProxy`, whose limiter shares its state with every other
process through the configured backend.
"""

from ratelimit.proxy.core import (
    ProxyError,
    ProxyRequest,
    ProxyResponse,
    RestProxy,
    RpcStatus,
    open_rest_proxy,
)

__all__ = ["ProxyError", "ProxyRequest", "ProxyResponse", "RestProxy", "RpcStatus", "open_rest_proxy"]
