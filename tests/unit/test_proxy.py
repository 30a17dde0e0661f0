"""villi-proxy against real sockets on loopback: an aiohttp server upstream, raw TCP
clients, the proxy's transparent upstream bound to the client's address (127.0.0.2),
per-request verdicts, and every bad input the issue lists."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest
from aiohttp import WSMsgType, web

from villi.policy.entry import Direction
from villi.policy.http import HTTPRule
from villi.policy.l7table import L7Entry
from villi.proxy.control import ControlServer, ProxyClient
from villi.proxy.records import L7Record
from villi.proxy.relay import Limits
from villi.proxy.server import ProxyServer
from villi.proxy.store import PolicyStore

CLIENT_IP = "127.0.0.2"
CLIENT_ID = 1000


async def _upstream_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def any_path(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername")[0] if request.transport else ""
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "peer": peer, "len": len(body),
                                  "x-env": request.headers.get("x-env"),
                                  "chunked": request.headers.get("transfer-encoding")})

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 65536)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(text="slow")

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
        return sock

    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", any_path)
    return app


@dataclass
class Rig:
    proxy_port: int
    upstream_port: int
    store: PolicyStore
    server: ProxyServer
    records: list[L7Record] = field(default_factory=list)

    def set_rules(self, *rules: HTTPRule, identity: int = CLIENT_ID) -> None:
        entry = L7Entry(Direction.INGRESS, identity, self.upstream_port, 0, 5, rules)
        self.store.replace({"version": len(self.records), "endpoints": [
            {"id": 7, "ip": "127.0.0.1", "identity": 2000, "l7": [entry.to_wire()]}],
            "ipcache": {CLIENT_IP: CLIENT_ID}})

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.proxy_port,
                                             local_addr=(CLIENT_IP, 0))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    runner = web.AppRunner(await _upstream_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]
    store = PolicyStore()
    records: list[L7Record] = []
    server = ProxyServer(store, records.append,
                         Limits(header_timeout=0.5, response_timeout=5),
                         orig_dst=lambda _w: ("127.0.0.1", upstream_port), mark=0)
    port = await server.listen(Direction.INGRESS, 0, host="127.0.0.1")
    r = Rig(port, upstream_port, store, server, records)
    r.set_rules(HTTPRule("GET"), HTTPRule("POST", "/v1/request-landing"))
    yield r
    await server.close()
    await runner.cleanup()


class _Resp:
    def __init__(self) -> None:
        self.body = b""
        self.done = False
        self.headers: dict[str, str] = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Reader:
    """Reads consecutive responses off one connection (keeps leftover bytes)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def response(self, timeout: float = 5,
                       last: bool = False) -> tuple[int, bytes, dict[str, str]]:
        """``last``: nothing follows on this connection, so read in big chunks."""
        state = _Resp()
        parser = httptools.HttpResponseParser(state)
        while not state.done:
            data = await asyncio.wait_for(self.reader.read(65536 if last else 1), timeout)
            if not data:  # byte by byte: never over-read into the next response
                raise ConnectionError("closed")
            parser.feed_data(data)
        return parser.get_status_code(), state.body, state.headers


async def _request(rig: Rig, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
    reader, writer = await rig.connect()
    writer.write(raw)
    try:
        return await Reader(reader).response()
    finally:
        writer.close()


async def test_allowed_forwarded_denied_403_and_server_sees_client_ip(rig: Rig) -> None:
    code, body, _ = await _request(rig, b"GET /a?b=1 HTTP/1.1\r\nHost: deathstar\r\n\r\n")
    assert code == 200
    seen = json.loads(body)
    assert seen["path"] == "/a?b=1" and seen["peer"] == CLIENT_IP
    code, body, _ = await _request(rig, b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: d\r\n"
                                        b"Content-Length: 0\r\n\r\n")
    assert (code, body) == (403, b"Access denied\r\n")
    kinds = [(r.type, r.verdict, r.code, r.method) for r in rig.records]
    assert kinds == [("REQUEST", "FORWARDED", 0, "GET"), ("RESPONSE", "FORWARDED", 200, "GET"),
                     ("REQUEST", "DROPPED", 0, "PUT"), ("RESPONSE", "FORWARDED", 403, "PUT")]
    first = rig.records[0]
    assert (first.src_ip, first.src_identity, first.endpoint, first.cookie) == (
        CLIENT_IP, CLIENT_ID, 7, 5)
    assert first.url == "http://deathstar/a?b=1" and rig.records[1].latency_ns > 0
    assert rig.server.stats.denied == 1 and rig.server.stats.forwarded == 1


async def test_keep_alive_per_request_verdict_follows_policy_change(rig: Rig) -> None:
    reader, writer = await rig.connect()
    responses = Reader(reader)
    landing = (b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n\r\nok")
    writer.write(landing)
    assert (await responses.response())[0] == 200
    rig.set_rules(HTTPRule("GET"))  # landing no longer allowed
    writer.write(landing)
    assert (await responses.response())[:2] == (403, b"Access denied\r\n")
    writer.write(b"GET /x HTTP/1.1\r\nHost: d\r\n\r\n")  # the connection stays usable
    assert (await responses.response())[0] == 200
    rig.set_rules(HTTPRule("POST"))
    writer.write(landing)
    assert (await responses.response())[0] == 200
    writer.close()


async def test_pipelined_requests_answered_in_order(rig: Rig) -> None:
    reader, writer = await rig.connect()
    responses = Reader(reader)
    writer.write(b"GET /1 HTTP/1.1\r\nHost: d\r\n\r\n"
                 b"DELETE /2 HTTP/1.1\r\nHost: d\r\n\r\n"
                 b"GET /slow HTTP/1.1\r\nHost: d\r\n\r\n"
                 b"GET /4 HTTP/1.1\r\nHost: d\r\n\r\n")
    first, second, third, fourth = [await responses.response() for _ in range(4)]
    assert json.loads(first[1])["path"] == "/1"
    assert second[0] == 403
    assert third[1] == b"slow"
    assert json.loads(fourth[1])["path"] == "/4"
    writer.close()


async def test_chunked_request_body_is_streamed_and_rechunked(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(20):
        writer.write(b"1000\r\n" + b"a" * 4096 + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    code, body, _ = await Reader(reader).response()
    assert code == 200 and json.loads(body)["len"] == 20 * 4096
    assert json.loads(body)["chunked"] == "chunked"
    writer.close()


async def test_large_bodies_both_ways(rig: Rig) -> None:
    size = 8 * 1024 * 1024
    reader, writer = await rig.connect()
    writer.write(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    chunk = b"b" * 65536
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    responses = Reader(reader)
    code, body, _ = await responses.response(timeout=30)
    assert code == 200 and json.loads(body)["len"] == size
    writer.write(b"GET /big HTTP/1.1\r\nHost: d\r\n\r\n")
    code, body, _ = await responses.response(timeout=30, last=True)
    assert code == 200 and len(body) == 64 * 65536
    writer.close()


async def test_expect_100_continue(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert line.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    code, body, _ = await Reader(reader).response()
    assert code == 200 and json.loads(body)["len"] == 5
    writer.close()
    # denied: 403 at once (no 100), then the connection closes (the body never comes)
    reader, writer = await rig.connect()
    writer.write(b"PUT /x HTTP/1.1\r\nHost: d\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    code, body, headers = await Reader(reader).response()
    assert (code, body, headers.get("connection")) == (403, b"Access denied\r\n", "close")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_websocket_upgrade_is_passed_through(rig: Rig) -> None:
    import aiohttp

    conn = aiohttp.TCPConnector(local_addr=(CLIENT_IP, 0))
    async with aiohttp.ClientSession(connector=conn) as session, session.ws_connect(
            f"http://127.0.0.1:{rig.proxy_port}/ws") as ws:
        await ws.send_str("hi")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.data == "echo:hi"
        await ws.send_str("again")  # no L7 after the upgrade
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:again"
    assert rig.server.stats.upgrades == 1


async def test_upstream_errors_are_503(rig: Rig) -> None:
    rig.server.orig_dst = lambda _w: ("127.0.0.1", 1)  # nothing listens on port 1
    entry = L7Entry(Direction.INGRESS, 0, 0, 0, 5, (HTTPRule("GET"),))
    rig.store.replace({"endpoints": [{"id": 7, "ip": "127.0.0.1", "l7": [entry.to_wire()]}]})
    reader, writer = await rig.connect()
    responses = Reader(reader)
    writer.write(b"GET / HTTP/1.1\r\nHost: d\r\n\r\n")
    assert (await responses.response())[0] == 503
    writer.write(b"GET / HTTP/1.1\r\nHost: d\r\n\r\n")  # still usable
    assert (await responses.response())[0] == 503
    writer.close()
    assert rig.server.stats.upstream_errors == 2


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nContent-Length: nope\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
])
async def test_malformed_request_is_400_and_close(rig: Rig, raw: bytes) -> None:
    reader, writer = await rig.connect()
    writer.write(raw)
    code, _body, headers = await Reader(reader).response()
    assert code == 400 and headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_slowloris_times_out_without_blocking_others(rig: Rig) -> None:
    slow_reader, slow_writer = await rig.connect()
    slow_writer.write(b"GET / HTTP/1.1\r\nHost: d\r\n")  # never finishes its head
    for _ in range(3):
        code, _body, _ = await _request(rig, b"GET /ok HTTP/1.1\r\nHost: d\r\n\r\n")
        assert code == 200
    closed = False
    for _ in range(30):  # trickle one header at a time: the head never completes in time
        try:
            slow_writer.write(b"X-A: b\r\n")
            closed = await asyncio.wait_for(slow_reader.read(), 0.1) == b""
        except TimeoutError:
            continue
        except ConnectionError:
            closed = True
        if closed:
            break
    assert closed
    assert rig.server.stats.timeouts == 1
    slow_writer.close()


async def test_control_socket_snapshot_records_and_agent_absence(tmp_path: Path,
                                                                 rig: Rig) -> None:
    control = ControlServer(tmp_path / "proxy.sock", rig.store, rig.server.stats.as_dict)
    await control.start()
    rig.server.emit = control.emit  # type: ignore[misc]
    got: list[L7Record] = []
    # no agent yet: the record waits in the queue
    assert (await _request(rig, b"GET / HTTP/1.1\r\nHost: d\r\n\r\n"))[0] == 200
    client = ProxyClient(tmp_path / "proxy.sock", got.extend)
    client.start()
    await asyncio.wait_for(client.connected.wait(), 5)
    for _ in range(50):
        if len(got) >= 2:
            break
        await asyncio.sleep(0.05)
    assert [r.type for r in got] == ["REQUEST", "RESPONSE"]
    entry = L7Entry(Direction.INGRESS, CLIENT_ID, rig.upstream_port, 0, 9, (HTTPRule("PUT"),))
    assert await client.push({"version": 3, "endpoints": [
        {"id": 7, "ip": "127.0.0.1", "l7": [entry.to_wire()]}], "ipcache": {CLIENT_IP: 1000}})
    assert (await _request(rig, b"GET / HTTP/1.1\r\nHost: d\r\n\r\n"))[0] == 403
    stats = await client.stats()
    assert stats is not None and stats["version"] == 3 and stats["denied"] == 1
    assert not await ControlClientBad.send(tmp_path / "proxy.sock")
    await client.close()
    # the agent went away: the proxy keeps the last policy
    assert (await _request(rig, b"PUT / HTTP/1.1\r\nHost: d\r\n\r\n"))[0] == 200
    await control.close()


class ControlClientBad:
    @staticmethod
    async def send(path: Path) -> bool:
        """A malformed snapshot is an error reply, and the policy in force is kept."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "snapshot", "snapshot": {"endpoints": [{"ip": 1}]}}\n')
        reply = json.loads(await reader.readline())
        writer.close()
        return reply["op"] == "ack"


def test_egress_to_a_same_node_server_applies_its_ingress_rules_too() -> None:
    from villi.policy.http import Request

    egress = L7Entry(Direction.EGRESS, 0, 80, 0, 1, (HTTPRule("GET|PUT"),))
    ingress = L7Entry(Direction.INGRESS, 0, 80, 0, 2, (HTTPRule("GET"),))
    store = PolicyStore()
    store.replace({"endpoints": [
        {"id": 1, "ip": "10.0.0.1", "identity": 100, "l7": [egress.to_wire()]},
        {"id": 2, "ip": "10.0.0.2", "identity": 200, "l7": [ingress.to_wire()]}]})
    get, _ = store.decide(Direction.EGRESS, "10.0.0.1", "10.0.0.2", 80, Request("GET", "/"))
    put, _ = store.decide(Direction.EGRESS, "10.0.0.1", "10.0.0.2", 80, Request("PUT", "/"))
    assert get.verdict.allowed and not put.verdict.allowed and put.cookie == 2


def test_policy_removed_endpoint_not_enforced_allows_proxied_requests() -> None:
    from villi.policy.http import Request

    store = PolicyStore()
    store.replace({"endpoints": [{"id": 2, "ip": "10.0.0.2", "l7": [],
                                  "enforced": [False, False]}]})
    ok, _ = store.decide(Direction.INGRESS, "10.0.0.1", "10.0.0.2", 80, Request("PUT", "/"))
    assert ok.verdict.allowed
    store.replace({"endpoints": [{"id": 2, "ip": "10.0.0.2", "l7": [],
                                  "enforced": [True, False]}]})
    no, _ = store.decide(Direction.INGRESS, "10.0.0.1", "10.0.0.2", 80, Request("PUT", "/"))
    assert not no.verdict.allowed  # enforced and no rule allows it any more


def test_state_file_survives_proxy_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    entry = L7Entry(Direction.INGRESS, 0, 80, 0, 1, (HTTPRule("GET"),))
    PolicyStore(state).replace({"version": 4, "endpoints": [
        {"id": 1, "ip": "10.0.0.1", "l7": [entry.to_wire()]}]})
    again = PolicyStore(state)
    assert again.snapshot.version == 4 and "10.0.0.1" in again.snapshot.endpoints
    state.write_text("{not json")
    assert PolicyStore(state).snapshot.version == 0
