"""The agent's side of L7 policy: run the node's villi-proxy and keep it fed.

The proxy is a separate process (started detached, in the node namespace, the first
time an endpoint's policy redirects to it) so it survives agent restarts; a restarted
agent reconnects to the running one. After every policy or ipcache change the agent
pushes a full snapshot (local endpoints with their HTTP rules, IP → identity) — the
proxy keeps the last one while the agent is away. L7 records come back over the same
socket and become flows in the agent's observer.

The node namespace gets the routing that delivers packets the datapath assigned to the
proxy's sockets locally (fwmark 0x200/0xf00 → table 2004 → local 0.0.0.0/0 dev lo).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from villi.datapath import abi
from villi.netns import routes
from villi.proxy.control import ProxyClient
from villi.proxy.records import L7Record

if TYPE_CHECKING:
    from villi.agent.daemon import Agent

log = logging.getLogger(__name__)
DEBOUNCE = 0.02
WATCHDOG = 2.0


class L7Proxy:
    """Starts/attaches to the node's proxy and pushes policy snapshots to it."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        state = agent.config.state_path
        self.control = state / "proxy.sock"
        self.state_file = state / "proxy-state.json"
        self.log_file = state / "proxy.log"
        self.client: ProxyClient | None = None
        self.version = 0
        self.pushed: str | None = None
        self.records_received = 0
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_stats: dict[str, int] = {}
        agent.metrics.registry.register(_ProxyCollector(self))

    async def start(self) -> None:
        """Attach to a proxy that outlived the previous agent; start feeding."""
        if self.control.exists():
            await self.agent.kernel(self._attach_netdev)
            await self._attach()
        self._task = asyncio.create_task(self._push_loop(), name="villi-l7-push")
        self.request_push()

    async def stop(self) -> None:
        """Detach (the proxy keeps running with the last snapshot)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    def request_push(self) -> None:
        self._wanted.set()

    # -- internals ---------------------------------------------------------------------

    async def _attach(self) -> None:
        if self.client is not None:
            return
        self.client = ProxyClient(self.control, self._on_records)
        self.client.start()

    async def _ensure_proxy(self) -> None:
        """Start the proxy unless one answers on the control socket."""
        if self.client is not None and self.client.connected.is_set():
            return  # connected: a probe connection would take the proxy's agent slot
        try:
            _r, w = await asyncio.open_unix_connection(str(self.control))
            w.close()
        except OSError:
            await self.agent.kernel(routes.ensure_local_mark_routing, abi.MARK_MAGIC_TO_PROXY,
                                    abi.MARK_MAGIC_MASK, abi.PROXY_ROUTE_TABLE)
            await self.agent.kernel(self._attach_netdev)
            cmd = [sys.executable, "-m", "villi.proxy.main", "--control", str(self.control),
                   "--state-file", str(self.state_file),
                   "--ingress-port", str(abi.PROXY_INGRESS_PORT),
                   "--egress-port", str(abi.PROXY_EGRESS_PORT)]
            with open(self.log_file, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=out, start_new_session=True,
                                        env=dict(os.environ))
            log.info("started villi-proxy (pid %d), control %s", proc.pid, self.control)
            for _ in range(100):
                if self.control.exists():
                    break
                await asyncio.sleep(0.05)
        await self._attach()
        assert self.client is not None
        await asyncio.wait_for(self.client.connected.wait(), 10)

    def _attach_netdev(self) -> None:
        """L7 redirects of traffic from other nodes happen on the underlay device."""
        node_ip = getattr(self.agent, "node_ip", None)
        ifindex = routes.ifindex_of(node_ip) if node_ip else None
        if ifindex is None:
            log.warning("no device holds the node IP %s: ingress L7 rules will drop "
                        "traffic from other nodes (reason 178)", node_ip)
            return
        self.agent.datapath.attach_netdev(ifindex)

    def snapshot(self) -> dict[str, Any]:
        agent = self.agent
        endpoints = []
        any_l7 = False
        for ep in agent.endpoints.endpoints.values():
            try:
                table = agent.policy.resolver.l7_table(ep.id)
                pol = agent.policy.resolver.policy(ep.id)
                enforced = [pol.ingress_enforced, pol.egress_enforced]
            except KeyError:
                table, enforced = [], [True, True]
            any_l7 = any_l7 or bool(table)
            endpoints.append({"id": ep.id, "ip": ep.ipv4, "identity": ep.identity,
                              "l7": [e.to_wire() for e in table], "enforced": enforced})
        if not any_l7 and self.client is None:
            # No L7 policy and no proxy: nothing will be pushed, so do not build the
            # ipcache copy (O(pods): 2.4 s at 50,000 pods, blocking the event loop on
            # every policy change; bench/scale.py, issue 16).
            return {"endpoints": endpoints, "ipcache": {}, "l7": False}
        ipcache = {ip: int(data.get("identity", 2))
                   for ip, data in agent.ipcache_sync.entries.items()}
        ipcache.update(agent.policy.cidr_identities())
        return {"endpoints": endpoints, "ipcache": ipcache, "l7": any_l7}

    async def _push_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wanted.wait(), WATCHDOG)
            except TimeoutError:
                if self.client is not None and self.client.connected.is_set():
                    self.last_stats = await self.client.stats() or self.last_stats
                # The proxy died (or was killed): start a new one with the last policy.
                if self.pushed is not None and self.client is not None and \
                        not self.client.connected.is_set():
                    log.warning("villi-proxy is not answering; restarting it")
                    self.pushed = None
                    self._wanted.set()
                continue
            await asyncio.sleep(DEBOUNCE)
            self._wanted.clear()
            try:
                snap = self.snapshot()
                if not snap.pop("l7") and self.client is None:
                    continue  # no L7 policy here yet: no proxy needed
                text = json.dumps(snap, sort_keys=True)
                if text == self.pushed:
                    continue
                await self._ensure_proxy()
                assert self.client is not None
                self.version += 1
                snap["version"] = self.version
                if await self.client.push(snap):
                    self.pushed = text
                else:
                    log.warning("villi-proxy did not take the policy snapshot; retrying")
                    await asyncio.sleep(0.5)
                    self._wanted.set()
            except (OSError, TimeoutError) as exc:
                log.warning("villi-proxy: %s", exc)
                await asyncio.sleep(0.5)
                self._wanted.set()

    def _on_records(self, records: list[L7Record]) -> None:
        self.records_received += len(records)
        observer = getattr(self.agent, "observer", None)
        if observer is not None:
            with contextlib.suppress(AttributeError):
                observer.ingest_l7(records)

    async def stats(self) -> dict[str, int] | None:
        return await self.client.stats() if self.client is not None else None


class _ProxyCollector:
    """The proxy's counters (polled over the control socket) as agent metrics."""

    COUNTERS = {"requests": "HTTP requests seen", "forwarded": "requests forwarded",
                "denied": "requests denied by L7 policy (403)",
                "upstream_errors": "upstream failures (503/504)",
                "bad_requests": "malformed requests (400)",
                "timeouts": "clients that timed out sending a request head",
                "connections": "client connections accepted",
                "upgrades": "connections upgraded (no L7 after)"}

    def __init__(self, owner: L7Proxy) -> None:
        self.owner = owner

    def collect(self) -> Any:
        stats = self.owner.last_stats
        for name, doc in self.COUNTERS.items():
            family = CounterMetricFamily(f"villi_proxy_{name}", f"villi-proxy: {doc}")
            family.add_metric([], stats.get(name, 0))
            yield family
        active = GaugeMetricFamily("villi_proxy_active_connections",
                                   "villi-proxy: client connections open now")
        active.add_metric([], stats.get("active", 0))
        yield active
        received = CounterMetricFamily("villi_proxy_records_received",
                                       "L7 records the agent received from villi-proxy")
        received.add_metric([], self.owner.records_received)
        yield received


__all__ = ["L7Proxy", "Path"]
