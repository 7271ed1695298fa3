"""Wire compatibility: the real `@spectacles/proxy` client (Node, over `@spectacles/brokers` AMQP) drives our
RPC front against the simulator.

What the client does (0.1.3, read in node_modules/@spectacles/proxy/src/Client.ts): `get/post/...(path,
body, {headers, query})` -> `broker.call('REQUEST', {method, path, body, query, headers})` with its own
`Authorization: Bot <token>`; a non-Buffer body is sent as a JSON string with `content-type:
application/json`. It returns the decoded `{status, body}` reply as is: status 0 carries Discord's answer
(`body.body` a Buffer of the bytes Discord sent), other statuses an error string. It never sends CANCEL.
"""

from __future__ import annotations

import shutil

import orjson
import pytest
import trio

from benchmarks.simulator import DEFAULT_TOKEN
from ratelimit.proxy.amqp import RestRpcServer
from tests.ratelimit.proxy_helpers import AMQP_URL, proxy_stack, unique_group
from tests.workers.test_publish_spectacles_node import NODE_DIR, ensure_node_modules, spectacles_url
from workers.amqp_bridge import open_amqp

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm"
    ),
]


async def ensure_proxy_client() -> None:
    """`npm ci` when the checked-out node_modules predates @spectacles/proxy."""
    if not (NODE_DIR / "node_modules" / "@spectacles" / "proxy").is_dir():
        with trio.fail_after(240):
            await trio.run_process(
                ["npm", "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_stdout=True,
                capture_stderr=True,
            )
    await ensure_node_modules()


async def test_spectacles_proxy_client_gets_posts_and_sees_error_statuses() -> None:
    await ensure_proxy_client()
    group = unique_group()
    with trio.fail_after(40):
        async with proxy_stack() as stack, open_amqp(AMQP_URL) as amqp:
            server = RestRpcServer(amqp, stack.proxy, group=group)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve)
                    with trio.fail_after(30):
                        result = await trio.run_process(
                            [
                                "node",
                                "spectacles_proxy_client.js",
                                spectacles_url(AMQP_URL),
                                group,
                                DEFAULT_TOKEN,
                            ],
                            cwd=NODE_DIR,
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await amqp.delete_queue(server.queue)
            ledger = await stack.ledger()
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    replies = {line["name"]: line for line in map(orjson.loads, result.stdout.decode().splitlines())}

    get = replies["get"]
    assert get["status"] == 0
    assert get["body"]["status"] == 200
    assert get["body"]["bodyType"] == "Buffer"  # a view of the reply message, bytes as Discord sent them
    assert orjson.loads(get["body"]["text"])["username"] == "simulator-bot"
    assert get["body"]["url"] == stack.harness.sim.addresses.rest_url + "/users/@me"
    assert get["body"]["headers"]["content-type"].startswith("application/json")

    for name, content in (("post", "from node"), ("post-buffer", "buffer")):
        post = replies[name]
        assert (post["status"], post["body"]["status"]) == (0, 200), post
        assert orjson.loads(post["body"]["text"])["content"] == content
        assert post["body"]["headers"]["x-ratelimit-limit"] == "5"

    query = replies["get-query"]
    assert (query["status"], query["body"]["status"]) == (0, 200)
    assert query["body"]["url"].endswith("/channels/1/messages?limit=2")

    # Discord's 404 is an answer (status 0); the proxy's own refusals are statuses 3 and 5.
    assert (replies["not-found"]["status"], replies["not-found"]["body"]["status"]) == (0, 404)
    assert replies["bad-path"] == {"name": "bad-path", "status": 3, "body": "path must start with '/'"}
    assert replies["bad-method"]["status"] == 5
    assert ledger["by_status"] == {"200": 4, "404": 1}
