"""The relay's HTTP API (the agent's flow API, merged across nodes) and its listeners.

Routes: ``/v1/flows`` (same parameters as an agent's; ``node_status`` lines name nodes
that did not answer), ``/v1/flows/status``, ``/v1/nodes``, and ``/v1/policy`` (one
applied policy as YAML, read from the kvstore, for the UI's explanations).
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from villi.errors import VilliError
from villi.relay.hub import Relay

PASS_PARAMS = ("filter", "last", "first", "since", "until")


def build_app(relay: Relay, store: Any = None, client_token: str | None = None
              ) -> web.Application:
    expected = f"Bearer {client_token}".encode() if client_token else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if expected is not None and request.transport is not None and \
                request.transport.get_extra_info("peername") and \
                not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                        expected):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    async def flows(request: web.Request) -> web.StreamResponse:
        q = request.query
        params = {k: q[k] for k in PASS_PARAMS if k in q}
        try:
            json.loads(params.get("filter", "[]"))
        except ValueError as e:
            return web.json_response({"error": f"bad filter: {e}"}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        if q.get("follow") in ("1", "true"):
            await resp.prepare(request)
            try:
                async for item in relay.follow({**params, "follow": "1"}):
                    line = item["flow"] if "flow" in item else item
                    await resp.write((json.dumps(line) + "\n").encode())
            except ConnectionResetError:
                pass
            return resp
        out, missing = await relay.query(params)
        await resp.prepare(request)
        body = "".join(json.dumps(f) + "\n" for f in out)
        for node, err in sorted(missing.items()):
            body += json.dumps({"node_status": {"state_change": "NODE_UNAVAILABLE",
                                                "node_names": [node], "message": err}}) + "\n"
        await resp.write(body.encode())
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await relay.status())

    async def nodes(request: web.Request) -> web.Response:
        return web.json_response((await relay.status())["nodes"])

    async def policy(request: web.Request) -> web.Response:
        from villi.resources import resource_key

        q = request.query
        if store is None:
            return web.json_response({"error": "the relay has no --kvstore"}, status=404)
        if not q.get("kind") or not q.get("name"):
            return web.json_response({"error": "kind and name are required"}, status=400)
        kv = await store.get(resource_key(q["kind"], q.get("namespace") or None, q["name"]))
        if kv is None:
            return web.json_response({"error": f"no {q['kind']} "
                                      f"{q.get('namespace', '')}/{q['name']}"}, status=404)
        doc = json.loads(kv.value)
        return web.json_response({"yaml": yaml.safe_dump(doc, sort_keys=False), "resource": doc})

    app = web.Application(middlewares=[guard])
    app.router.add_get("/v1/flows", flows)
    app.router.add_get("/v1/flows/status", status)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/policy", policy)
    return app


def split_listen(addr: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:///path`` or ``/path`` → ("unix", path); ``HOST:PORT`` → ("tcp", (h, p))."""
    if addr.startswith("unix://"):
        return "unix", addr[len("unix://"):]
    if addr.startswith("/"):
        return "unix", addr
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise VilliError(f"listen address {addr!r}: use unix:///PATH or HOST:PORT")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


async def start_site(runner: web.AppRunner, addr: str) -> None:
    """Listen on a unix socket (mode 0600) or TCP."""
    kind, where = split_listen(addr)
    if kind == "unix":
        path = Path(str(where))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_socket():
            path.unlink()
        old = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old)
    else:
        assert isinstance(where, tuple)
        host, port = where
        await web.TCPSite(runner, host, port).start()
