"""One proxied client connection: HTTP/1.1 in, a verdict per request, HTTP/1.1 out.

Requests are parsed with httptools (llhttp) and judged when their head is complete,
against the rules in force at that moment, so a keep-alive connection follows policy
changes request by request. An allowed request is re-serialised to the upstream (with
any ``headerMatches`` edits) and its body streamed as it arrives (chunked bodies are
re-chunked; nothing is buffered whole); a denied one gets ``403 Access denied`` and its
body is read and dropped, so the connection stays usable.

One request is in flight upstream at a time: pipelined requests wait for the previous
response, which keeps responses (forwarded or local) in request order and lets the
upstream bytes be forwarded raw. The response of the request in flight is relayed
concurrently with the request body, which is what ``Expect: 100-continue`` needs.

Errors: a malformed request → ``400`` and close; the upstream unreachable or closing
before answering → ``503``; no response in time → ``504``; a head that does not arrive
within ``header_timeout`` (slowloris) or an idle keep-alive → close. An allowed
``Upgrade`` that the server accepts (``101``) turns the connection into a byte pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from villi.policy.entry import Direction
from villi.policy.http import Request
from villi.proxy._wire import (
    BAD_REQUEST,
    FORBIDDEN,
    FORBIDDEN_CLOSE,
    GATEWAY_TIMEOUT,
    UNAVAILABLE,
    UNAVAILABLE_CLOSE,
    Limits,
    RequestEvents,
    ResponseEvents,
    Stats,
)
from villi.proxy.records import DROPPED, ERROR, FORWARDED, REQUEST, RESPONSE, L7Record
from villi.proxy.store import ConnectionContext, PolicyStore

log = logging.getLogger("villi.proxy")

__all__ = ["ClientConnection", "Emit", "IP_TRANSPARENT", "Limits", "Stats", "UPSTREAM_PORTS"]

IP_TRANSPARENT = 19
SO_MARK = 36
READ_SIZE = 65536
#: Source ports of upstream connections (bound to the client's IP): above the pods'
#: ephemeral range (Linux default 32768-60999), so a proxied connection never gets the
#: same 4-tuple, hence the same conntrack entry, as a connection of the client pod itself.
UPSTREAM_PORTS = range(61000, 65536)
_next_port = itertools.count()


@dataclass(slots=True)
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass(slots=True)
class Exchange:
    """One request and what became of it."""

    method: str
    url: str
    host: str
    version: str
    start_ns: int
    ctx: ConnectionContext
    cookie: int = 0
    rule_index: int = -1
    forward: bool = False
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bool = False
    switched: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


Emit = Callable[[L7Record], None]


def _bind_upstream(sock: socket.socket, ip: str) -> None:
    for _ in range(64):
        port = UPSTREAM_PORTS[next(_next_port) % len(UPSTREAM_PORTS)]
        try:
            sock.bind((ip, port))
            return
        except OSError as exc:
            if exc.errno != 98:  # EADDRINUSE: try the next port
                raise
    raise OSError(98, f"no free upstream port for {ip} in {UPSTREAM_PORTS}")


class ClientConnection:
    """Serve one accepted client socket until it closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 direction: Direction, store: PolicyStore, orig_dst: tuple[str, int],
                 stats: Stats, limits: Limits, emit: Emit, transparent: bool = True,
                 mark: int = 0) -> None:
        self.reader, self.writer = reader, writer
        self.direction = direction
        self.store = store
        peer = writer.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1]))
        self.dst = orig_dst
        self.stats, self.limits, self.emit = stats, limits, emit
        self.transparent, self.mark = transparent, mark
        self.upstream: Upstream | None = None
        self.current: Exchange | None = None
        self.response_task: asyncio.Task[None] | None = None
        self.closing = False
        self.in_head = False
        self.head_started = 0.0
        self.head_bytes = 0

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        try:
            await self._run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # one connection must never take the proxy down
            log.exception("connection from %s:%d failed", *self.client)
            self.stats.upstream_errors += 1
        finally:
            self.stats.active -= 1
            if self.response_task is not None and not self.response_task.done():
                self.response_task.cancel()
                with contextlib.suppress(BaseException):
                    await self.response_task
            self._drop_upstream()
            self.writer.close()

    async def _run(self) -> None:
        events = RequestEvents()
        parser = httptools.HttpRequestParser(events)
        events.parser = parser
        upgrade_rest: bytes | None = None
        while not self.closing:
            data = await self._read_client()
            if not data:
                break
            if self.in_head:
                self.head_bytes += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                upgrade_rest = data[int(exc.args[0]):]
            except httptools.HttpParserError:
                await self._process(events.events)
                await self._wait_exchange()
                self.stats.bad_requests += 1
                await self._send(BAD_REQUEST)
                return
            await self._process(events.events)
            events.events.clear()
            if self.in_head and self.head_bytes > self.limits.max_head_bytes:
                self.stats.bad_requests += 1
                await self._wait_exchange()
                await self._send(BAD_REQUEST)
                return
            if upgrade_rest is not None:
                await self._wait_exchange()
                if self.current is not None and self.current.switched and self.upstream:
                    await self._tunnel(upgrade_rest)
                return
        await self._wait_exchange()

    async def _read_client(self) -> bytes:
        if self.in_head:
            timeout = self.head_started + self.limits.header_timeout - time.monotonic()
        elif self.current is not None and not self.current.done.is_set() and (
                self.response_task is None or self.current.forward):
            timeout = self.limits.body_timeout
        else:
            timeout = self.limits.idle_timeout
        try:
            # asyncio.timeout, not wait_for: no extra task per read on the hot path
            async with asyncio.timeout(max(timeout, 0.001)):
                return await self.reader.read(READ_SIZE)
        except TimeoutError:
            if self.in_head:
                self.stats.timeouts += 1
            return b""

    async def _process(self, events: list[tuple]) -> None:
        for event in events:
            kind = event[0]
            if kind == "begin":
                if not self.in_head:
                    self.in_head = True
                    self.head_started = time.monotonic()
                    self.head_bytes = 0
            elif kind == "head":
                self.in_head = False
                await self._on_head(*event[1:])
            elif kind == "body":
                await self._on_body(event[1])
            else:
                await self._on_end()
            if self.closing:
                return

    # -- requests ----------------------------------------------------------------------

    async def _on_head(self, method: str, url: bytes, raw_headers: list[tuple[bytes, bytes]],
                       version: str, keep_alive: bool, upgrade: bool) -> None:
        await self._wait_exchange()
        if self.closing:
            return
        self.stats.requests += 1
        headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1"))
                        for k, v in raw_headers)
        target = url.decode("latin-1")
        request = Request(method, target, headers)
        host = request.header("host") or self.dst[0]
        decision, ctx = self.store.decide(self.direction, self.client[0], self.dst[0],
                                          self.dst[1], request)
        chunked = "chunked" in (request.header("transfer-encoding") or "").lower()
        has_body = chunked or int(request.header("content-length") or 0) > 0
        ex = Exchange(method, target, host, f"HTTP/{version}", time.time_ns(), ctx,
                      decision.cookie, decision.rule_index, decision.verdict.allowed,
                      chunked, keep_alive, upgrade)
        self.current = ex
        self._record(ex, REQUEST, FORWARDED if ex.forward else DROPPED, headers=headers)
        if not ex.forward:
            self.stats.denied += 1
            expect = (request.header("expect") or "").lower() == "100-continue"
            # The client waits for 100 before sending the body: we cannot tell where the
            # next request starts unless it gives up the connection.
            close = (expect and has_body) or not keep_alive
            await self._local_response(ex, FORBIDDEN_CLOSE if close else FORBIDDEN, 403)
            if close:
                self.closing = True
            return
        self.stats.forwarded += 1
        upstream = await self._connect()
        if upstream is None:
            self.stats.upstream_errors += 1
            ex.forward = False
            await self._local_response(ex, UNAVAILABLE if keep_alive else UNAVAILABLE_CLOSE,
                                       503)
            return
        head = self._serialize(method, target, version, raw_headers, decision.verdict.edits)
        upstream.writer.write(head)
        if not has_body and not upgrade:
            # Nothing to stream alongside the response: relay it right here (no task
            # per request on the common path; pipelined requests wait anyway).
            await self._relay_response(ex, upstream)
            return
        self.response_task = asyncio.create_task(self._relay_response(ex, upstream))

    async def _on_body(self, body: bytes) -> None:
        ex, upstream = self.current, self.upstream
        if ex is None or not ex.forward or upstream is None:
            return  # a denied request's body is read and dropped
        if ex.chunked:
            upstream.writer.write(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            upstream.writer.write(body)
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                await upstream.writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the response side reports the failure

    async def _on_end(self) -> None:
        ex, upstream = self.current, self.upstream
        if ex is not None and ex.forward and ex.chunked and upstream is not None:
            upstream.writer.write(b"0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await upstream.writer.drain()
        if ex is not None and not ex.keep_alive:
            await self._wait_exchange()
            self.closing = True

    @staticmethod
    def _serialize(method: str, target: str, version: str,
                   raw_headers: list[tuple[bytes, bytes]],
                   edits: tuple[tuple[str, str, str], ...]) -> bytes:
        headers = list(raw_headers)
        for action, name, value in edits:
            lname = name.lower().encode()
            if action in ("delete", "replace"):
                headers = [(k, v) for k, v in headers if k.lower() != lname]
            if action in ("add", "replace"):
                headers.append((name.encode(), value.encode()))
        lines = [f"{method} {target} HTTP/{version}".encode()]
        lines += [k + b": " + v for k, v in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    # -- responses ---------------------------------------------------------------------

    async def _relay_response(self, ex: Exchange, upstream: Upstream) -> None:
        events = ResponseEvents()
        parser = httptools.HttpResponseParser(events)
        events.parser = parser
        head_only = ex.method == "HEAD"
        buffered = b""
        sent = False
        try:
            while True:
                try:
                    async with asyncio.timeout(self.limits.response_timeout):
                        data = await upstream.reader.read(READ_SIZE)
                except TimeoutError:
                    self._drop_upstream()
                    if not sent:
                        await self._local_response(ex, GATEWAY_TIMEOUT, 504, done=False)
                    self.closing = True
                    return
                except ConnectionError:
                    data = b""
                if not data:
                    self._drop_upstream()
                    if events.head_done and not events.sized and not head_only:
                        self._record(ex, RESPONSE, FORWARDED, code=events.status)
                        self.closing = True  # an EOF-delimited body: the client needs EOF
                    elif not sent:
                        self.stats.upstream_errors += 1
                        await self._local_response(ex, UNAVAILABLE_CLOSE, 503, done=False)
                        self.closing = True
                    else:
                        self.closing = True
                    return
                if head_only:
                    buffered += data
                    end = buffered.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    data = buffered[:end + 4]
                    with contextlib.suppress(httptools.HttpParserError):
                        parser.feed_data(data)
                    events.final = True
                else:
                    try:
                        parser.feed_data(data)
                    except httptools.HttpParserUpgrade:
                        ex.switched = events.status == 101
                        events.final = True
                    except httptools.HttpParserError:
                        self._drop_upstream()
                        self.stats.upstream_errors += 1
                        if not sent:
                            await self._local_response(ex, UNAVAILABLE_CLOSE, 503, done=False)
                        self.closing = True
                        return
                self.writer.write(data)
                sent = True
                await self.writer.drain()
                if events.final:
                    break
            self._record(ex, RESPONSE, FORWARDED, code=events.status)
            if ex.switched:
                self.stats.upgrades += 1
            elif not events.keep_alive:
                self._drop_upstream()
        finally:
            ex.done.set()

    async def _local_response(self, ex: Exchange, payload: bytes, code: int,
                              done: bool = True) -> None:
        await self._send(payload)
        self._record(ex, RESPONSE, FORWARDED if code == 403 else ERROR, code=code)
        if done:
            ex.done.set()

    async def _send(self, payload: bytes) -> None:
        self.writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _wait_exchange(self) -> None:
        if self.response_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.response_task
        self.response_task = None

    # -- upstream ----------------------------------------------------------------------

    async def _connect(self) -> Upstream | None:
        if self.upstream is not None and not self.upstream.writer.is_closing():
            return self.upstream
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if self.transparent:
                # Connect from the client's address: the server (and its policy) sees it.
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                _bind_upstream(sock, self.client[0])
            if self.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            await asyncio.wait_for(loop.sock_connect(sock, self.dst),
                                   self.limits.connect_timeout)
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        except (OSError, TimeoutError) as exc:
            log.info("upstream %s:%d from %s: %s", *self.dst, self.client[0], exc)
            sock.close()
            return None
        self.upstream = Upstream(reader, writer)
        return self.upstream

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.writer.close()
            self.upstream = None

    async def _tunnel(self, rest: bytes) -> None:
        """After ``101 Switching Protocols``: bytes both ways, no more L7."""
        upstream = self.upstream
        assert upstream is not None
        if rest:
            upstream.writer.write(rest)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(READ_SIZE):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

        await asyncio.gather(pipe(self.reader, upstream.writer),
                             pipe(upstream.reader, self.writer))

    # -- records -----------------------------------------------------------------------

    def _record(self, ex: Exchange, kind: str, verdict: str, *, code: int = 0,
                headers: tuple[tuple[str, str], ...] = ()) -> None:
        now = time.time_ns()
        ctx = ex.ctx
        self.emit(L7Record(
            kind, now, "ingress" if self.direction is Direction.INGRESS else "egress",
            self.client[0], self.client[1], self.dst[0], self.dst[1], ctx.src_identity,
            ctx.dst_identity, ctx.endpoint, verdict, ex.method, f"http://{ex.host}{ex.url}",
            ex.version, code, now - ex.start_ns if kind == RESPONSE else 0, ex.cookie,
            ex.rule_index, headers))
