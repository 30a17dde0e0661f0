"""villi.agentclient, the one client of the agent API (CNI plugin, CLI, lab), against
a real aiohttp server on a unix socket: JSON calls, error mapping, streamed lines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web

from villi.agentclient import AgentClient, AgentError, stream_lines, target_of
from villi.errors import AgentUnavailable


async def _serve(tmp_path: Path) -> tuple[web.AppRunner, str]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "q": dict(request.query)})

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"error": "no endpoint x", "code": 0}, status=404)

    async def flows(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write((json.dumps({"n": i}) + "\n").encode())
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/healthz", health)
    app.router.add_get("/v1/endpoint/x", missing)
    app.router.add_get("/v1/flows", flows)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "agent.sock")
    await web.UnixSite(runner, sock).start()
    return runner, sock


def test_target_quotes_params() -> None:
    assert target_of("/v1/flows", {"filter": '[{"a": 1}]', "last": 5, "x": None}) == \
        "/v1/flows?filter=%5B%7B%22a%22:%201%7D%5D&last=5"


async def test_json_calls_errors_and_streams(tmp_path: Path) -> None:
    runner, sock = await _serve(tmp_path)
    try:
        client = AgentClient(sock, timeout=5)
        got = await asyncio.to_thread(client.get, "/v1/healthz", params={"a": "b c"})
        assert got == {"status": "ok", "q": {"a": "b c"}}
        with pytest.raises(AgentError) as exc:
            await asyncio.to_thread(client.get, "/v1/endpoint/x")
        assert exc.value.status == 404 and exc.value.message == "no endpoint x"
        assert str(exc.value) == f"agent {sock}: no endpoint x"
        lines = [json.loads(line) async for line in stream_lines(sock, "/v1/flows")]
        assert lines == [{"n": 0}, {"n": 1}, {"n": 2}]
    finally:
        await runner.cleanup()
    with pytest.raises(AgentUnavailable):
        AgentClient(sock, timeout=1).get("/v1/healthz")
    with pytest.raises(AgentUnavailable):
        async for _ in stream_lines(sock, "/v1/flows"):
            pass
