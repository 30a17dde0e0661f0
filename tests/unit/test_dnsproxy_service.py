"""The DNS proxy service against a fake agent link and a real dnsmasq: DNS keeps being
answered while the agent is away, learned IPs are re-posted when it comes back, expired
entries without a live connection are withdrawn; and the agent side's input parsing and
cache listing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from dnslib import RCODE
from dnslib import DNSRecord as Wire

from villi.agent.fqdn import cache_listing, learned_names, parse_learned
from villi.dnsproxy.agentlink import AgentLinkError
from villi.dnsproxy.proxy import ProxyConfig
from villi.dnsproxy.service import DNSProxyService

from .test_dnsproxy import dnsmasq  # noqa: F401  (the module fixture)


class FakeLink:
    def __init__(self) -> None:
        self.up = True
        self.posts: list[tuple[dict, list]] = []

    async def patterns(self) -> list[str]:
        if not self.up:
            raise AgentLinkError("down")
        return ["*.example.com"]

    async def dns_rules(self) -> dict[str, list[str]]:
        if not self.up:
            raise AgentLinkError("down")
        return {"127.0.0.1": ["*.example.com."]}

    async def learned(self, changed: dict, removed: list) -> None:
        if not self.up:
            raise AgentLinkError("down")
        self.posts.append((dict(changed), list(removed)))

    async def close(self) -> None:
        pass


def _ask(port: int, name: str) -> Wire:
    return Wire.parse(Wire.question(name).send("127.0.0.1", port, timeout=3))


def test_service_survives_agent_absence_and_reposts(dnsmasq: int,  # noqa: F811
                                                    tmp_path: Path) -> None:
    link = FakeLink()
    alive = {"ok": True}
    svc = DNSProxyService(link, tmp_path / "fqdn-cache.json",  # type: ignore[arg-type]
                          config=ProxyConfig(upstream=lambda d: ("127.0.0.1", dnsmasq)),
                          is_alive=lambda ep, ip: alive["ok"], refresh=3600)

    async def main() -> None:
        _, port = await svc.start("127.0.0.1", 0)
        try:
            ans = await asyncio.to_thread(_ask, port, "api.example.com")
            assert ans.header.rcode == RCODE.NOERROR
            (changed, _), = link.posts
            assert list(changed) == ["198.51.100.10"]
            # the agent goes away: answers keep coming (posting fails fast)
            link.up = False
            await svc.refresh()
            t0 = time.monotonic()
            ans = await asyncio.to_thread(_ask, port, "short.example.com")
            assert ans.header.rcode == RCODE.NOERROR and time.monotonic() - t0 < 1
            refused = await asyncio.to_thread(_ask, port, "evil.org")
            assert refused.header.rcode == RCODE.REFUSED   # last rules kept
            # it comes back: everything learned is posted again
            link.up = True
            link.posts.clear()
            await svc.refresh()
            reposted = {ip for changed, _ in link.posts for ip in changed}
            assert reposted == {"198.51.100.10", "198.51.100.11"}
            # expiry: kept while alive, withdrawn when the connection is gone
            cache = svc.caches.for_endpoint("127.0.0.1")
            for entries in (cache.lookup("short.example.com."),):
                for e in entries.values():
                    e.expires = 0
            link.posts.clear()
            await svc.collect()
            assert link.posts == [] and "198.51.100.11" in cache.allowed_ips()
            alive["ok"] = False
            await svc.collect()
            assert link.posts == [({}, ["198.51.100.11"])]
        finally:
            await svc.stop()
    asyncio.run(main())
    rows = cache_listing(tmp_path / "fqdn-cache.json")
    assert [(r["name"], r["ip"], r["source"]) for r in rows] == \
        [("api.example.com.", "198.51.100.10", "lookup")]
    assert learned_names(tmp_path / "fqdn-cache.json") == {
        "198.51.100.10": {"api.example.com."}}


def test_parse_learned_names_bad_fields() -> None:
    changed, removed = parse_learned({"changed": {"1.2.3.4": [
        "cidr:1.2.3.4/32", "reserved:world", "fqdn:*.a.com."]}, "removed": ["5.6.7.8"]})
    assert "1.2.3.4" in changed and removed == ["5.6.7.8"]
    with pytest.raises(ValueError, match="not an IPv4"):
        parse_learned({"changed": {"x": ["fqdn:a."]}})
    with pytest.raises(ValueError, match="fqdn: label"):
        parse_learned({"changed": {"1.2.3.4": ["cidr:1.2.3.4/32"]}})
    with pytest.raises(ValueError, match="removed"):
        parse_learned({"removed": ["nope"]})


def test_villi_proxy_hosts_the_dns_proxy_with_rules_from_snapshots(tmp_path: Path) -> None:
    """villi.dnsproxy.host: DNS rules arrive with the agent's policy snapshots (and from
    the persisted one at start); refused queries become DNS records on the control
    socket, with each side's identity from the snapshot's ipcache."""
    from villi.dnsproxy import host
    from villi.proxy.store import PolicyStore, parse_snapshot

    class Control:
        def __init__(self) -> None:
            self.records: list[dict] = []
            self.stats = lambda: {"requests": 0}

        def emit(self, record: object) -> None:
            self.records.append(record.to_wire())  # type: ignore[attr-defined]

    args = host.parser().parse_args([
        "--control", str(tmp_path / "c.sock"), "--agent-socket", str(tmp_path / "a.sock"),
        "--dns-cache-file", str(tmp_path / "fqdn-cache.json"), "--dns-port", "0",
        "--no-transparent"])
    state = tmp_path / "proxy-state.json"
    state.write_text('{"dns": {"rules": {"127.0.0.1": ["*.example.com."]}, '
                     '"patterns": []}, "ipcache": {"127.0.0.1": 256}}')
    store = PolicyStore(state)
    control = Control()

    plugin = host.DNSPlugin(args)

    async def run() -> None:
        stop = await plugin(store, control)  # type: ignore[arg-type]
        try:
            assert plugin.service is not None and plugin.service.proxy.address
            port = plugin.service.proxy.address[1]
            loop = asyncio.get_running_loop()
            ans = await loop.run_in_executor(None, _ask, port, "evil.org")
            assert ans.header.rcode == RCODE.REFUSED
            assert not plugin.service.proxy.allows("127.0.0.1", "evil.org.")
            store.replace({"dns": {"rules": {"127.0.0.1": ["*"]}, "patterns": []}})
            assert plugin.service.proxy.allows("127.0.0.1", "evil.org.")   # at once
            assert control.stats()["dns_refused"] == 1
        finally:
            await stop()

    asyncio.run(run())
    snap = parse_snapshot({"endpoints": [
        {"id": 1, "ip": "10.64.0.1", "enforced": [True, False]},
        {"id": 2, "ip": "10.64.0.2", "enforced": [True, True]}],
        "dns": {"rules": {"10.64.0.2": ["a.example.com."]}, "patterns": ["x."]}})
    assert host.dns_rules_of(snap) == (["x."], {"10.64.0.1": ["*"],
                                                "10.64.0.2": ["a.example.com."]})
    (rec,) = control.records
    assert rec["kind"] == "dns"
    flow = rec["flow"]
    assert flow["verdict"] == "DROPPED" and flow["l7"]["dns"]["query"] == "evil.org."
    assert flow["source"] == {"identity": 256}


def test_dns_snapshot_recomputes_rules_only_when_policies_or_endpoints_change() -> None:
    from types import SimpleNamespace

    from villi.agent import fqdn
    from villi.policy.simulate import PolicySimulator

    sim = PolicySimulator()
    sim.add_pod("prod/client", {"app": "client"}, "10.64.0.4")
    policy = SimpleNamespace(resolver=sim.resolver)
    assert fqdn.dns_snapshot(policy) == {"rules": {}, "patterns": []}
    sim.apply_yaml("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: d, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*.example.com"}]}
  - toFQDNs: [{matchName: api.example.com}]
""")
    first = fqdn.dns_snapshot(policy)
    assert first == {"rules": {"10.64.0.4": ["*.example.com."]},
                     "patterns": ["api.example.com."]}
    assert fqdn.dns_snapshot(policy)["rules"] is first["rules"]
    sim.add_pod("prod/client2", {"app": "client"}, "10.64.0.5")
    assert set(fqdn.dns_snapshot(policy)["rules"]) == {"10.64.0.4", "10.64.0.5"}
