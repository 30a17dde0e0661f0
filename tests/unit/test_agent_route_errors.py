"""Route handlers raise villi errors and the API's middleware answers them (one place
decides the HTTP status and body): bad filters, bad learned-IP bodies and bad endpoint
settings are 400s with the agent's usual ``{"error", "code"}`` body."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from villi.agent.api import errors_middleware
from villi.agent.fqdn import fqdn_routes
from villi.agent.observe import flow_routes


async def _client(routes: list[tuple[str, str, Any]]) -> TestClient:
    app = web.Application(middlewares=[errors_middleware])
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_bad_flow_filter_and_bad_integer_are_400(tmp_path: Path) -> None:
    client = await _client(flow_routes(cast(Any, None)))
    try:
        res = await client.get("/v1/flows", params={"filter": '[{"bogus": 1}]'})
        assert res.status == 400
        body = await res.json()
        assert body["error"].startswith("bad filter:") and body["code"] == 0
        res = await client.get("/v1/flows", params={"last": "ten"})
        assert res.status == 400
        assert (await res.json())["error"] == "last must be an integer"
    finally:
        await client.close()


async def test_bad_learned_ips_body_is_400(tmp_path: Path) -> None:
    routes = fqdn_routes(cast(Any, None), tmp_path / "state")
    (learned,) = [path for method, path, _ in routes if method == "POST"]
    client = await _client(routes)
    try:
        res = await client.post(learned, json={"changed": "not a mapping"})
        assert res.status == 400
        assert (await res.json())["code"] == 0
        res = await client.post(learned, data=b"{not json")
        assert res.status == 400
    finally:
        await client.close()
