"""The REST proxy (DESIGN 3.6): Discord's REST API for any number of clients, under the shared limits.

- `request`: what a front received, checked field by field into a `ProxyRequest`.
- `errors`: `ProxyError` with its RPC status (`RpcStatus`) and HTTP status, and its one log line.
- `send_mark`: `SendMark`, set once a request reached the network.
- `rest_proxy`: `RestProxy`, one request sent through `RatelimitedTransport`; why identity encoding, no
  `httpx.AsyncClient`, and when the bot's token is added.
- `rpc`: the AMQP RPC wire format of `@spectacles/proxy` (MessagePack requests, `{status, body}` replies).
- `amqp`: the RPC consumer on RabbitMQ (queue `AMQP_GROUP:AMQP_EVENT`, replies, CANCEL).
- `http`: the HTTP front (`PROXY_HTTP_ADDRESS`, every worker on one port with SO_REUSEPORT).

Each worker process runs both fronts on one `RestProxy`, whose limiter shares its state with every other
process through the configured backend.
"""

from ratelimit.proxy.amqp import RestRpcServer, RpcBroker, RpcDelivery
from ratelimit.proxy.errors import ProxyError, RpcStatus
from ratelimit.proxy.http import HttpLimits, HttpProxyServer
from ratelimit.proxy.request import ProxyRequest, make_request
from ratelimit.proxy.rest_proxy import (
    DEFAULT_TIMEOUT_S,
    ProxyResponse,
    ProxyStatistics,
    RestProxy,
    open_rest_proxy,
)
from ratelimit.proxy.send_mark import SendMark

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HttpLimits",
    "HttpProxyServer",
    "ProxyError",
    "ProxyRequest",
    "ProxyResponse",
    "ProxyStatistics",
    "RestProxy",
    "RestRpcServer",
    "RpcBroker",
    "RpcDelivery",
    "RpcStatus",
    "SendMark",
    "make_request",
    "open_rest_proxy",
]
