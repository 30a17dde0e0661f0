"""The agent's flow endpoint on TCP, for ``villi relay`` on other hosts.

The unix socket API is root-only by file mode; a TCP port has no such guard, so this
endpoint serves only the read-only flow routes (``/v1/flows``, ``/v1/flows/status``)
and only to clients that present the shared bearer token (compared in constant time).
Connections are bounded: a relay holds one follow stream per agent, so a small limit
(``--flows-max-connections``, 16) leaves room for a few relays and CLI readers while a
misbehaving client cannot exhaust the agent's file descriptors or event loop.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from villi.errors import VilliError

if TYPE_CHECKING:
    from villi.agent.daemon import Agent

log = logging.getLogger(__name__)


def read_token(path: Path) -> str:
    """The shared token from its file (first line; the file should be mode 0600)."""
    try:
        lines = path.read_text().strip().splitlines()
    except OSError as e:
        raise VilliError(f"cannot read flow token file {path}: {e}") from e
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise VilliError(f"{path}: the flow token must be at least 16 characters")
    return token


def parse_listen(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port), with a clear error."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise VilliError(f"listen address {addr!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_flow_app(routes: list[tuple[str, str, Any]], token: str,
                   max_connections: int) -> web.Application:
    """An app serving ``routes`` to token holders, at most ``max_connections`` at once."""
    active = 0
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal active
        got = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return web.json_response({"error": "missing or wrong bearer token", "code": 0},
                                     status=401)
        if active >= max_connections:
            return web.json_response({"error": f"too many flow readers (limit "
                                      f"{max_connections})", "code": 0}, status=503)
        active += 1
        try:
            return await handler(request)
        finally:
            active -= 1

    app = web.Application(middlewares=[guard])
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


async def serve_flows_tcp(agent: Agent) -> web.AppRunner | None:
    """Start the TCP flow endpoint when ``--flows-listen`` is set (else None)."""
    from villi.agent.observe import flow_routes

    cfg = agent.config
    if not cfg.flows_listen:
        return None
    if cfg.flows_token_file is None:
        raise VilliError("--flows-listen needs --flows-token-file (the endpoint is "
                         "authenticated)")
    host, port = parse_listen(cfg.flows_listen)
    app = build_flow_app(flow_routes(agent), read_token(Path(cfg.flows_token_file)),
                         cfg.flows_max_connections)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("flow endpoint on tcp %s:%d (token, max %d readers)", host, port,
             cfg.flows_max_connections)
    return runner
