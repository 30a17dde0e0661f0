"""The node's DNS proxy service: proxy + caches + name manager + agent link + GC.

``villi-proxy`` (the per-node proxy process, ``villi.dnsproxy.host``) hosts this in
transparent mode behind the eBPF steering: the agent's policy snapshots bring the rules
(:meth:`DNSProxyService.apply`) and answers are forwarded to where the pod sent them. It
also runs on its own (``python -m villi.dnsproxy.service``, rules fetched from the
agent) with ``--upstream`` naming the real server, for pods that query it directly and
for the benchmark.

Background work, every ``refresh`` seconds: ask the agent for patterns and rules (only
used when no snapshots bring them; the answer also says the agent is there); re-post
every learned IP once an agent comes back (a restarted agent rebuilt its policy without
them); expire cache entries, release zombies without a live CT entry, persist the caches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from villi.dnsproxy.agentlink import AgentLink, AgentLinkError
from villi.dnsproxy.cache import CacheStore, LiveCheck, collect
from villi.dnsproxy.names import NameManager
from villi.dnsproxy.proxy import DNSProxy, ProxyConfig
from villi.dnsproxy.records import DNSRecord
from villi.identity.labels import LabelSet
from villi.policy.fqdn import DNSRuleSet

log = logging.getLogger("villi.dnsproxy")
CACHE_FILE = "fqdn-cache.json"   # the agent's /v1/fqdn/cache reads the same file


class DNSProxyService:
    def __init__(self, link: AgentLink, cache_file: Path, *, config: ProxyConfig,
                 min_ttl: int = 0, max_ips_per_name: int = 1000,
                 is_alive: LiveCheck | None = None,
                 snapshot: Callable[[], object] | None = None,
                 on_record: Callable[[DNSRecord], None] | None = None,
                 refresh: float = 1.0, rules_from_agent: bool = True) -> None:
        self.link = link
        self.caches = CacheStore(cache_file, min_ttl=min_ttl, max_ips_per_name=max_ips_per_name)
        self.names = NameManager(self._post)
        self.proxy = DNSProxy(self.caches, config=config, on_learned=self._learned,
                              on_record=on_record)
        self.is_alive = is_alive or (lambda ep, ip: True)   # no CT: keep zombies
        self.snapshot = snapshot
        self.refresh_every = refresh
        self.rules_from_agent = rules_from_agent
        self.agent_up = False
        self.unposted = False
        self._task: asyncio.Task[None] | None = None

    async def _post(self, changed: dict[str, LabelSet], removed: list[str]) -> None:
        try:
            await self.link.learned(changed, removed)
        except AgentLinkError as e:
            self.unposted = True   # re-posted when the agent answers again
            log.warning("dns proxy: cannot post learned IPs: %s", e)

    async def _learned(self, endpoint: str, name: str, ips: list[str]) -> None:
        await self.names.learned(name, ips)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        restored = self.caches.load()
        log.info("dns proxy: restored the DNS caches of %d endpoints", restored)
        await self.refresh()
        addr = await self.proxy.start(host, port)
        self._task = asyncio.ensure_future(self._loop())
        return addr

    async def refresh(self) -> None:
        """Rules and patterns from the agent; after an agent (re)start, re-post
        everything learned (restored caches included)."""
        try:
            patterns = await self.link.patterns()
            rules = await self.link.dns_rules() if self.rules_from_agent else {}
        except AgentLinkError as e:
            if self.agent_up:
                log.warning("dns proxy: agent away, keeping the last rules: %s", e)
            self.agent_up = False
            return
        came_back = not self.agent_up
        self.agent_up = True
        if self.rules_from_agent:
            await self.apply(patterns, rules)
        if came_back or self.unposted:
            self.unposted = False
            for cache in self.caches.caches.values():
                for entry in cache.entries():
                    await self.names.learned(entry.name, [entry.ip])
            labelled = self.names.labelled()
            if labelled:
                from villi.policy.fqdn import fqdn_identity_labels

                await self._post({ip: fqdn_identity_labels(ip, p)
                                  for ip, p in labelled.items()}, [])

    async def apply(self, patterns: list[str], rules: dict[str, list[str]]) -> None:
        """The toFQDNs patterns and per-endpoint DNS rules in force now."""
        await self.names.set_patterns(patterns)
        self.proxy.replace_rules({ep: DNSRuleSet(tuple(p)) for ep, p in rules.items()})

    async def collect(self) -> None:
        if self.snapshot is not None:
            try:
                self.snapshot()
            except OSError as e:
                log.info("dns proxy: CT unreadable, keeping zombies: %s", e)
                return
        for _ep, ip, names in collect(self.caches, self.is_alive):
            if not any(ip in c.allowed_ips() for c in self.caches.caches.values()):
                for name in names:
                    await self.names.forget(ip, name)
        self.caches.save()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            try:
                await self.refresh()
                await self.collect()
            except Exception as e:   # keep serving DNS whatever happens here
                log.error("dns proxy: background round failed: %s", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.proxy.stop()
        await self.link.close()


def _addr(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "0.0.0.0", int(port or default_port)) if ":" in text else (text,
                                                                               default_port)


def add_options(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options every DNS proxy process takes (Cilium's ``--tofqdns-*`` names)."""
    ap.add_argument("--pin-dir", help="the node's pinned maps (CT, for zombies)")
    ap.add_argument("--tofqdns-dns-reject-response-code", default="refused",
                    choices=["refused", "nameError"])
    ap.add_argument("--tofqdns-min-ttl", type=int, default=0)
    ap.add_argument("--tofqdns-endpoint-max-ip-per-hostname", type=int, default=1000)
    ap.add_argument("--tofqdns-proxy-response-max-delay", type=float, default=0.1,
                    help="seconds an answer is held for the datapath update (0.1)")


def from_options(args: argparse.Namespace, cache_file: Path, *, transparent: bool,
                 refresh: float, upstream: Callable[[tuple[str, int]], tuple[str, int]]
                 | None = None, on_record: Callable[[DNSRecord], None] | None = None,
                 rules_from_agent: bool = True) -> DNSProxyService:
    """A service built from :func:`add_options`' options (and ``--agent-socket``)."""
    config = ProxyConfig(reject_rcode=args.tofqdns_dns_reject_response_code,
                         hold=args.tofqdns_proxy_response_max_delay,
                         transparent=transparent, upstream=upstream or (lambda dst: dst))
    ct = None
    if args.pin_dir:
        from villi.dnsproxy.ct import PinnedCT

        ct = PinnedCT(args.pin_dir)
    return DNSProxyService(
        AgentLink(str(args.agent_socket)), cache_file, config=config,
        min_ttl=args.tofqdns_min_ttl,
        max_ips_per_name=args.tofqdns_endpoint_max_ip_per_hostname,
        is_alive=ct.is_alive if ct else None, snapshot=ct.snapshot if ct else None,
        on_record=on_record, refresh=refresh, rules_from_agent=rules_from_agent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="villi-dns-proxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netns", help="network namespace to serve in (the node's); entered "
                    "with setns, so the bpffs stays visible")
    ap.add_argument("--agent-socket", required=True)
    ap.add_argument("--state-dir", required=True, help="the agent's state directory (the "
                    f"caches persist in {CACHE_FILE} there)")
    ap.add_argument("--listen", default="0.0.0.0:10053", help="HOST:PORT (UDP and TCP)")
    ap.add_argument("--upstream", help="HOST[:PORT]: forward here instead of the original "
                    "destination (direct queries, before the eBPF steering)")
    ap.add_argument("--transparent", action="store_true",
                    help="IP_TRANSPARENT listener fed by bpf_sk_assign")
    add_options(ap)
    ap.add_argument("--refresh", type=float, default=1.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.netns:
        from villi._nsenter import enter_netns_for_good

        enter_netns_for_good(args.netns)
    upstream = _addr(args.upstream, 53) if args.upstream else None
    service = from_options(
        args, Path(args.state_dir) / CACHE_FILE, transparent=args.transparent,
        refresh=args.refresh, upstream=(lambda dst: upstream) if upstream else None,
        on_record=lambda r: log.debug("dns %s %s %s %s %s", r.kind.lower(), r.verdict,
                                     r.endpoint, r.query, ",".join(r.ips)))

    async def run() -> None:
        host, port = _addr(args.listen, 10053)
        addr = await service.start(host, port)
        print(f"ready {addr[0]}:{addr[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await service.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
