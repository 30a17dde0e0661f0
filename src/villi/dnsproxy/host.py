"""``villi-proxy`` with the DNS proxy: the node's one proxy process, HTTP and DNS.

    python -m villi.dnsproxy.host --control SOCK --agent-socket AGENT.sock \\
        --dns-port 15053 --dns-cache-file STATE/fqdn-cache.json --pin-dir PINS

The agent starts this (not the bare ``villi.proxy.main``) so the DNS proxy lives apart
from the agent and keeps answering while it restarts. The datapath steers pods' port-53
traffic (UDP and TCP) of endpoints with ``rules.dns`` to ``0.0.0.0:<dns-port>``
(``bpf_sk_assign``); the proxy forwards each allowed query to the original destination
and answers from that address. Its inputs and outputs ride on the HTTP proxy's:

* rules: each policy snapshot the agent pushes carries ``dns: {rules: {endpoint IP:
  [patterns]}, patterns: [toFQDNs patterns]}`` (also kept in the proxy's state file, so
  a restarted proxy starts with the last ones);
* records: DNS records go back on the control socket next to the HTTP ones
  (``{"kind": "dns", "flow": <Hubble flow>}``) and become flows in the agent's observer;
* learned IPs: posted to the agent's API (``POST /v1/fqdn/learned``), which answers once
  identities, ipcache and policy maps are written *and* it has pushed the HTTP proxy a
  snapshot with the new peers — the answer is held until then
  (≤ ``--tofqdns-proxy-response-max-delay``), so a toFQDNs + HTTP rule judges the first
  request to a learned IP with its identity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from villi.datapath import abi
from villi.dnsproxy.records import DNSRecord
from villi.dnsproxy.service import DNSProxyService, add_options, from_options
from villi.policy.fqdn import DNSRuleSet
from villi.proxy import main as proxy_main
from villi.proxy.control import ControlServer
from villi.proxy.store import PolicyStore, Snapshot

log = logging.getLogger("villi.dnsproxy")


class _Wire:
    """A DNS record on the control socket, with the identities the proxy knows."""

    __slots__ = ("flow",)

    def __init__(self, flow: dict[str, Any]) -> None:
        self.flow = flow

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "dns", "flow": self.flow}


def dns_rules_of(snapshot: Snapshot) -> tuple[list[str], dict[str, list[str]]]:
    """(toFQDNs patterns, endpoint IP → DNS patterns) from an agent snapshot. A local
    endpoint whose egress is no longer enforced may ask anything: its queries reach the
    proxy only on a connection steered before the policy went (the CT entry keeps the
    redirect), as for HTTP."""
    dns = snapshot.raw.get("dns") or {}
    patterns = [str(p) for p in dns.get("patterns") or []]
    rules = {str(ip): [str(p) for p in pats] for ip, pats in (dns.get("rules") or {}).items()}
    for ip, ep in snapshot.endpoints.items():
        if not ep.enforced[1]:
            rules.setdefault(ip, ["*"])
    return patterns, rules


class DNSPlugin:
    """The DNS proxy as a villi-proxy plugin (see :data:`villi.proxy.main.Plugin`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.service: DNSProxyService | None = None
        self._applying: set[asyncio.Future[None]] = set()

    async def __call__(self, store: PolicyStore,
                       control: ControlServer) -> Callable[[], Awaitable[None]]:
        args = self.args

        def on_record(rec: DNSRecord) -> None:
            flow = rec.to_flow()
            ipcache = store.snapshot.ipcache
            for side in ("source", "destination"):
                flow[side] = {"identity": ipcache.lookup(flow["IP"][side])}
            control.emit(_Wire(flow))

        service = self.service = from_options(
            args, args.dns_cache_file, transparent=not args.no_transparent,
            refresh=args.dns_refresh, on_record=on_record, rules_from_agent=False)

        def on_snapshot(snapshot: Snapshot) -> None:
            # The rules take effect at once; the name manager's label changes (new or
            # dropped toFQDNs patterns) follow asynchronously.
            patterns, rules = dns_rules_of(snapshot)
            service.proxy.replace_rules({ep: DNSRuleSet(tuple(p)) for ep, p in rules.items()})
            task = asyncio.ensure_future(service.names.set_patterns(patterns))
            self._applying.add(task)
            task.add_done_callback(self._applying.discard)

        await service.apply(*dns_rules_of(store.snapshot))   # the persisted snapshot
        store.listeners.append(on_snapshot)
        host = "127.0.0.1" if args.no_transparent else "0.0.0.0"
        await service.start(host, args.dns_port)
        base_stats = control.stats
        control.stats = lambda: {**base_stats(), **{
            f"dns_{k}": v for k, v in vars(service.proxy.stats).items()}}

        async def stop() -> None:
            store.listeners.remove(on_snapshot)
            for task in list(self._applying):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await service.stop()

        return stop


def parser() -> argparse.ArgumentParser:
    p = proxy_main.parser()
    p.prog = "villi-proxy"
    g = p.add_argument_group("DNS proxy")
    g.add_argument("--agent-socket", type=Path, required=True,
                   help="the node agent's API socket (learned IPs are posted there)")
    g.add_argument("--dns-port", type=int, default=abi.PROXY_DNS_PORT,
                   help="UDP and TCP listener the datapath steers port-53 traffic to")
    g.add_argument("--dns-cache-file", type=Path, required=True,
                   help="where the per-endpoint DNS caches persist (the agent reads it)")
    add_options(g)
    g.add_argument("--dns-refresh", type=float, default=1.0,
                   help="seconds between GC rounds (TTL expiry, zombies, cache file)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    proxy_main.run(args, [DNSPlugin(args)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
