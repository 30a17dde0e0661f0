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
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from villi.agent.fqdn import dns_snapshot
from villi.datapath import abi
from villi.kvstore.schema import IpcacheEntry
from villi.netns import routes
from villi.proxy.control import ProxyClient
from villi.proxy.records import L7Record

log = logging.getLogger(__name__)
DEBOUNCE = 0.02
WATCHDOG = 2.0


class L7Policy(Protocol):
    """What the snapshot reads of the policy engine (``PolicySync``)."""

    @property
    def resolver(self) -> Any: ...
    def cidr_identities(self) -> dict[str, int]: ...


class L7Sources(Protocol):
    """Everything the proxy's snapshot is made of, from the agent's collaborators."""

    @property
    def endpoints(self) -> Mapping[int, Any]: ...     # local endpoints by id
    @property
    def policy(self) -> L7Policy: ...
    @property
    def remote(self) -> Mapping[str, IpcacheEntry]: ...   # every pod, by IP


class L7Proxy:
    """Starts/attaches to the node's proxy and pushes policy snapshots to it.

    ``kernel`` runs netlink work on the agent's kernel thread; ``attach_netdev``
    attaches the datapath to the underlay device; ``spawn`` runs the push loop as an
    agent-owned task; ``on_records`` takes the L7 records the proxy sends back (the
    agent's observer)."""

    def __init__(self, state: Path, node_ip: str | None, sources: L7Sources,
                 kernel: Callable[..., Awaitable[Any]], attach_netdev: Callable[[int], None],
                 registry: CollectorRegistry,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], Any],
                 on_records: Callable[[list[L7Record | dict[str, Any]]], None] | None = None,
                 proxy_args: list[str] | None = None) -> None:
        self.node_ip = node_ip
        self.sources = sources
        self.kernel = kernel
        self.attach_netdev = attach_netdev
        self.spawn = spawn
        self.on_records = on_records
        self.proxy_args = list(proxy_args or [])   # the DNS proxy's options
        self.control = state / "proxy.sock"
        self.state_file = state / "proxy-state.json"
        self.log_file = state / "proxy.log"
        self.client: ProxyClient | None = None
        self.version = 0
        self.pushed: str | None = None
        self.records_received = 0
        self._wanted = asyncio.Event()
        self._push_lock = asyncio.Lock()
        self.last_stats: dict[str, int] = {}
        registry.register(_ProxyCollector(self))

    async def start(self) -> None:
        """Attach to a proxy that outlived the previous agent; start feeding."""
        if self.control.exists():
            await self.kernel(self._attach_netdev)
            await self._attach()
        self.spawn(self._push_loop(), "l7-push")
        self.request_push()

    async def stop(self) -> None:
        """Detach (the proxy keeps running with the last snapshot); the push loop is
        cancelled with the agent's other tasks."""
        if self.client is not None:
            await self.client.close()

    def request_push(self) -> None:
        self._wanted.set()

    async def push_now(self) -> bool:
        """Push the current snapshot at once to a connected proxy (the DNS proxy's
        learned IPs: the HTTP proxy must know their identities and L7 rows before the
        answer is released); True once the proxy has it."""
        async with self._push_lock:   # snapshots reach the proxy in the order built
            if self.client is None or not self.client.connected.is_set():
                return False
            snap = self.snapshot()
            snap.pop("l7")
            text = json.dumps(snap, sort_keys=True)
            if text == self.pushed:
                return True
            self.version += 1
            snap["version"] = self.version
            if await self.client.push(snap):
                self.pushed = text
                return True
            return False

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
            await self.kernel(routes.ensure_local_mark_routing, abi.MARK_MAGIC_TO_PROXY,
                              abi.MARK_MAGIC_MASK, abi.PROXY_ROUTE_TABLE)
            await self.kernel(self._attach_netdev)
            cmd = [sys.executable, "-m", "villi.dnsproxy.host", "--control", str(self.control),
                   "--state-file", str(self.state_file),
                   "--ingress-port", str(abi.PROXY_INGRESS_PORT),
                   "--egress-port", str(abi.PROXY_EGRESS_PORT),
                   "--dns-port", str(abi.PROXY_DNS_PORT), *self.proxy_args]
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
        node_ip = self.node_ip
        ifindex = routes.ifindex_of(node_ip) if node_ip else None
        if ifindex is None:
            log.warning("no device holds the node IP %s: ingress L7 rules will drop "
                        "traffic from other nodes (reason 178)", node_ip)
            return
        self.attach_netdev(ifindex)

    def snapshot(self) -> dict[str, Any]:
        src = self.sources
        endpoints = []
        any_l7 = False
        for ep in src.endpoints.values():
            try:
                table = src.policy.resolver.l7_table(ep.id)
                pol = src.policy.resolver.policy(ep.id)
                enforced = [pol.ingress_enforced, pol.egress_enforced]
            except KeyError:
                table, enforced = [], [True, True]
            any_l7 = any_l7 or bool(table)
            endpoints.append({"id": ep.id, "ip": ep.ipv4, "identity": ep.identity,
                              "l7": [e.to_wire() for e in table], "enforced": enforced})
        dns = dns_snapshot(src.policy)
        any_l7 = any_l7 or bool(dns["rules"])
        if not any_l7 and self.client is None:
            # No L7 policy and no proxy: nothing will be pushed, so do not build the
            # ipcache copy (O(pods): 2.4 s at 50,000 pods, blocking the event loop on
            # every policy change; bench/scale.py, issue 16).
            return {"endpoints": endpoints, "ipcache": {}, "dns": dns, "l7": False}
        ipcache = {ip: entry.identity for ip, entry in src.remote.items()}
        ipcache.update(src.policy.cidr_identities())
        return {"endpoints": endpoints, "ipcache": ipcache, "dns": dns, "l7": any_l7}

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
                if not await self.push_now():
                    log.warning("villi-proxy did not take the policy snapshot; retrying")
                    await asyncio.sleep(0.5)
                    self._wanted.set()
            except (OSError, TimeoutError) as exc:
                log.warning("villi-proxy: %s", exc)
                await asyncio.sleep(0.5)
                self._wanted.set()

    def _on_records(self, records: list[L7Record | dict[str, Any]]) -> None:
        self.records_received += len(records)
        if self.on_records is not None:
            self.on_records(records)

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
                "upgrades": "connections upgraded (no L7 after)",
                "dns_queries": "DNS queries steered to the DNS proxy",
                "dns_refused": "DNS queries no DNS rule allows (REFUSED/NXDOMAIN)",
                "dns_forwarded": "DNS queries forwarded to their server",
                "dns_upstream_errors": "DNS queries whose server did not answer",
                "dns_hold_timeouts": "answers released before the datapath allowed their "
                                     "IPs (--tofqdns-proxy-response-max-delay)",
                "dns_learned_ips": "IPs learned from DNS answers"}

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
