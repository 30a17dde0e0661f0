"""The relay's core: query and follow every agent, merge by time, track who answers.

Queries fan out to every peer at once and are merged in time order; a peer that does
not answer is named in the result (``unavailable``), never silently missing. Follow
streams run one task per peer that reconnects with full-jitter backoff
(:mod:`villi.kvstore.backoff`) and reports its state changes into the same stream, as
Hubble Relay's ``node_status`` events do. The merged follow stream is ordered by a small
time-sorted buffer (Hubble's sort buffer: up to 100 flows or 1 s).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from villi.kvstore.backoff import Backoff, BackoffPolicy
from villi.relay.peers import Peer

log = logging.getLogger(__name__)
RECONNECT = BackoffPolicy(base=0.2, cap=10.0, max_attempts=None)
SORT_BUFFER = 100
SORT_DRAIN_S = 1.0

CONNECTED, UNAVAILABLE = "NODE_CONNECTED", "NODE_UNAVAILABLE"


@dataclass
class NodeState:
    peer: Peer
    state: str = "UNKNOWN_NODE_STATE"
    error: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    checked: float = 0.0


class Relay:
    def __init__(self, peers: Callable[[], Awaitable[list[Peer]]], token: str | None, *,
                 timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> None:
        self._peers = peers
        self.token = token
        self.tls = tls
        self.timeout = timeout
        self.nodes: dict[str, NodeState] = {}
        self.started_ns = time.time_ns()

    def _client(self, peer: Peer, timeout: float | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.AsyncClient(base_url=peer.url(self.tls is not None), timeout=timeout,
                                 headers=headers, verify=self.tls or True)

    async def peers(self) -> list[Peer]:
        peers = await self._peers()
        for p in peers:
            if p.name not in self.nodes or self.nodes[p.name].peer != p:
                self.nodes[p.name] = NodeState(p)
        for gone in set(self.nodes) - {p.name for p in peers}:
            del self.nodes[gone]
        return peers

    def _mark(self, peer: Peer, state: str, error: str = "") -> bool:
        """Record a peer's state; True when it changed."""
        node = self.nodes.setdefault(peer.name, NodeState(peer))
        changed = node.state != state
        node.state, node.error, node.checked = state, error, time.time()
        if changed and state == UNAVAILABLE:
            log.warning("node %s (%s) does not answer: %s", peer.name, peer.address, error)
        return changed

    # --- one-shot queries -------------------------------------------------------------
    async def _fetch(self, peer: Peer, params: dict[str, str]) -> list[dict[str, Any]]:
        async with self._client(peer, self.timeout) as c:
            resp = await c.get("/v1/flows", params=params)
            if resp.status_code != 200:
                raise RuntimeError(_error_text(resp))
            return [json.loads(line) for line in resp.text.splitlines() if line.strip()]

    async def query(self, params: dict[str, str]
                    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Merged flows of every peer, and {node: error} of peers that did not answer."""
        peers = await self.peers()
        results = await asyncio.gather(*(self._fetch(p, params) for p in peers),
                                       return_exceptions=True)
        flows: list[dict[str, Any]] = []
        missing: dict[str, str] = {}
        for peer, res in zip(peers, results, strict=True):
            if isinstance(res, BaseException):
                missing[peer.name] = _describe(res)
                self._mark(peer, UNAVAILABLE, missing[peer.name])
            else:
                self._mark(peer, CONNECTED)
                flows.extend(res)
        flows.sort(key=lambda f: f.get("time", ""))
        return flows, missing

    async def status(self) -> dict[str, Any]:
        """Per-node observer status and the sums Hubble's ServerStatus reports."""
        peers = await self.peers()

        async def one(peer: Peer) -> dict[str, Any]:
            async with self._client(peer, self.timeout) as c:
                resp = await c.get("/v1/flows/status")
                if resp.status_code != 200:
                    raise RuntimeError(_error_text(resp))
                return resp.json()

        results = await asyncio.gather(*(one(p) for p in peers), return_exceptions=True)
        total = {"num_flows": 0, "max_flows": 0, "seen_flows": 0, "uptime_ns": 0,
                 "flows_rate": 0.0}
        for peer, res in zip(peers, results, strict=True):
            if isinstance(res, BaseException):
                self._mark(peer, UNAVAILABLE, _describe(res))
                continue
            self._mark(peer, CONNECTED)
            self.nodes[peer.name].status = res
            total["num_flows"] += int(res.get("current_flows", 0))
            total["max_flows"] += int(res.get("max_flows", 0))
            total["seen_flows"] += int(res.get("seen_flows", 0))
            total["uptime_ns"] = max(total["uptime_ns"], int(res.get("uptime_ns", 0)))
            total["flows_rate"] += float(res.get("flows_per_second", 0.0))
        unavailable = sorted(n for n, s in self.nodes.items() if s.state != CONNECTED)
        return {**total, "num_connected_nodes": len(self.nodes) - len(unavailable),
                "num_unavailable_nodes": len(unavailable), "unavailable_nodes": unavailable,
                "nodes": [self.node_view(s) for s in self.nodes.values()]}

    @staticmethod
    def node_view(s: NodeState) -> dict[str, Any]:
        st = s.status
        return {"name": s.peer.name, "address": s.peer.address, "state": s.state,
                "error": s.error, "uptime_ns": int(st.get("uptime_ns", 0)),
                "num_flows": int(st.get("current_flows", 0)),
                "max_flows": int(st.get("max_flows", 0)),
                "seen_flows": int(st.get("seen_flows", 0))}

    # --- follow -----------------------------------------------------------------------
    async def _follow_peer(self, peer: Peer, params: dict[str, str],
                           out: asyncio.Queue[dict[str, Any]]) -> None:
        """Stream one peer's flows into ``out`` forever, reconnecting with backoff."""
        backoff = Backoff(RECONNECT)
        first = True
        while True:
            try:
                async with self._client(peer, None) as c:
                    p = dict(params) if first else {**params, "last": "0"}
                    async with c.stream("GET", "/v1/flows", params=p) as resp:
                        if resp.status_code != 200:
                            await resp.aread()
                            raise RuntimeError(_error_text(resp))
                        if self._mark(peer, CONNECTED):
                            await out.put(_node_status(CONNECTED, peer.name, ""))
                        backoff.reset()
                        first = False
                        async for line in resp.aiter_lines():
                            if line.strip():
                                await out.put({"flow": json.loads(line)})
                raise RuntimeError("stream closed by the agent")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure: report, back off, retry
                if self._mark(peer, UNAVAILABLE, _describe(e)):
                    await out.put(_node_status(UNAVAILABLE, peer.name, _describe(e)))
                await backoff.failed()

    async def follow(self, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """``{"flow": …}`` and ``{"node_status": …}`` items from every peer, merged."""
        peers = await self.peers()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        tasks = [asyncio.create_task(self._follow_peer(p, params, queue),
                                     name=f"relay-follow-{p.name}") for p in peers]
        heap: list[tuple[str, int, dict[str, Any]]] = []
        seq = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SORT_DRAIN_S
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(),
                                                  timeout=max(0.0, deadline - loop.time()))
                except TimeoutError:
                    item = None
                if item is not None and "flow" not in item:
                    yield item
                elif item is not None:
                    seq += 1
                    heapq.heappush(heap, (item["flow"].get("time", ""), seq, item))
                    while len(heap) > SORT_BUFFER:
                        yield heapq.heappop(heap)[2]
                if loop.time() >= deadline:
                    while heap:
                        yield heapq.heappop(heap)[2]
                    deadline = loop.time() + SORT_DRAIN_S
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _node_status(state: str, node: str, message: str) -> dict[str, Any]:
    return {"node_status": {"state_change": state, "node_names": [node], "message": message}}


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) < 200 else text[:200] + "…"


def _error_text(resp: httpx.Response) -> str:
    try:
        return f"HTTP {resp.status_code}: {resp.json().get('error', resp.text)}"
    except ValueError:
        return f"HTTP {resp.status_code}: {resp.text[:200]}"
