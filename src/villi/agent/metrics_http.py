"""The agent's Prometheus endpoints (9962, 9965): bounded, asyncio, no thread per client.

Why not ``prometheus_client.start_http_server``: it serves each connection on a new
thread with no timeout, so one pod that opens idle connections to the node's metrics
port makes the agent spawn hundreds of threads. This server runs on the agent's event
loop and bounds what a client can hold:

- at most ``max_connections`` at once; one more is closed at once (counted in
  ``refused``), never queued behind the others;
- a client has ``idle_timeout`` seconds to send its request head, and the answer is
  written within the same bound; every connection is closed after one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

_MAX_HEAD = 16 * 1024  # bytes of request line + headers


@dataclass
class MetricsServer:
    """``GET /metrics`` (or ``/``) of one registry on ``host:port``."""

    registry: CollectorRegistry
    port: int
    host: str = "0.0.0.0"
    max_connections: int = 16
    idle_timeout: float = 5.0
    active: int = 0
    refused: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=_MAX_HEAD, backlog=128)

    @property
    def bound_port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            self.refused += 1
            writer.close()
            return
        self.active += 1
        try:
            await asyncio.wait_for(self._answer(reader, writer), self.idle_timeout)
        except (TimeoutError, OSError, ValueError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request_line) < 2 or request_line[0] not in ("GET", "HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif request_line[1].split("?", 1)[0] not in ("/", "/metrics"):
            status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
        else:
            status, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        if request_line and request_line[0] == "HEAD":
            payload = b""
        else:
            payload = body
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + payload)
        await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
