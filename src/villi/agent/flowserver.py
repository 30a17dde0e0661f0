"""The agent's flow endpoint on TCP, for ``villi relay`` on other hosts.

The unix socket API is root-only by file mode; a TCP port has no such guard, so this
endpoint serves only the read-only flow routes (``/v1/flows``, ``/v1/flows/status``)
and only to authenticated clients: the shared bearer token (compared in constant time),
or a client certificate signed by ``--flows-tls-client-ca`` (mTLS), or both.
Connections are bounded: a relay holds one follow stream per agent, so a small limit
(``--flows-max-connections``, 16) leaves room for a few relays and CLI readers while a
misbehaving client cannot exhaust the agent's file descriptors or event loop.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from villi.agent.config import AgentConfig
from villi.errors import VilliError

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


def build_flow_app(routes: list[tuple[str, str, Any]], token: str | None,
                   max_connections: int) -> web.Application:
    """An app serving ``routes`` to token holders (any client when ``token`` is None:
    the TLS layer checked its certificate), at most ``max_connections`` at once."""
    active = 0
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal active
        got = request.headers.get("Authorization", "").encode()
        if expected is not None and not hmac.compare_digest(got, expected):
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


async def serve_flows_tcp(cfg: AgentConfig, routes: list[tuple[str, str, Any]]
                          ) -> web.AppRunner | None:
    """Start the TCP flow endpoint for ``routes`` (the observer's) when
    ``--flows-listen`` is set (else None)."""
    if not cfg.flows_listen:
        return None
    if cfg.flows_token_file is None and cfg.flows_tls_client_ca is None:
        raise VilliError("--flows-listen needs --flows-token-file or --flows-tls-client-ca "
                         "(the endpoint is authenticated)")
    host, port = parse_listen(cfg.flows_listen)
    token = read_token(Path(cfg.flows_token_file)) if cfg.flows_token_file else None
    ssl_ctx = server_tls(cfg.flows_tls_cert, cfg.flows_tls_key, cfg.flows_tls_client_ca)
    app = build_flow_app(routes, token, cfg.flows_max_connections)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_ctx).start()
    log.info("flow endpoint on tcp %s:%d (%s, max %d readers)", host, port,
             "mTLS" if cfg.flows_tls_client_ca else "TLS + token" if ssl_ctx else "token",
             cfg.flows_max_connections)
    return runner


def server_tls(cert: Path | None, key: Path | None, client_ca: Path | None
               ) -> ssl.SSLContext | None:
    """The TLS context of the flow endpoint (None: plain TCP); mTLS with ``client_ca``."""
    if cert is None and key is None and client_ca is None:
        return None
    if cert is None or key is None:
        raise VilliError("TLS for the flow endpoint needs both --flows-tls-cert and "
                         "--flows-tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise VilliError(f"flow endpoint TLS files ({cert}, {key}, {client_ca}): {e}") from e
    return ctx


def client_tls(ca: Path | None, cert: Path | None, key: Path | None
               ) -> ssl.SSLContext | None:
    """The relay's TLS context toward agents: verify them with ``ca``, present
    ``cert``/``key`` for mTLS (None: plain TCP)."""
    if ca is None and cert is None:
        return None
    if ca is None:
        raise VilliError("--tls-cert needs --tls-ca (the CA that signed the agents' "
                         "certificates)")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    try:
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise VilliError(f"relay TLS files ({cert}, {key}): {e}") from e
    return ctx
