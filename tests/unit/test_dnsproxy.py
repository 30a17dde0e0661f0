"""The DNS proxy core against a real dnsmasq on loopback: rule checks (REFUSED/NXDOMAIN),
forwarding over UDP and TCP to the original destination, learning answers into the
per-endpoint cache, the hold until the datapath hook completes (and its timeout), and
the Hubble DNS records."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import RCODE
from dnslib import DNSRecord as Wire

from villi.dnsproxy.cache import CacheStore
from villi.dnsproxy.names import NameManager
from villi.dnsproxy.proxy import DNSProxy, ProxyConfig
from villi.dnsproxy.records import DNSRecord
from villi.lab import dnsserver
from villi.policy.fqdn import DNSRuleSet

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None and
                                not Path("/usr/sbin/dnsmasq").exists(),
                                reason="dnsmasq (dnsmasq-base) is not installed")

RECORDS = {
    "api.example.com": {"ip": "198.51.100.10", "ttl": 30},
    "short.example.com": {"ip": "198.51.100.11", "ttl": 2},
    "evil.org": {"ip": "203.0.113.66", "ttl": 30},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    d = tmp_path_factory.mktemp("dnsmasq")
    files = dnsserver.RecordFile(d)
    files.save({k: {"name": k, **v} for k, v in RECORDS.items()})
    port = _free_port()
    proc = subprocess.Popen(dnsserver.command(files.conf, "127.0.0.1", port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                Wire.question("api.example.com").send("127.0.0.1", port, timeout=0.2)
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _udp(name: str, port: int, host: str = "127.0.0.1") -> Wire:
    return Wire.parse(Wire.question(name).send(host, port, timeout=3))


def _tcp(name: str, port: int) -> Wire:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        q = Wire.question(name).pack()
        s.sendall(struct.pack("!H", len(q)) + q)
        n = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
    return Wire.parse(data)


class Harness:
    def __init__(self, upstream_port: int, tmp: Path, **cfg: object) -> None:
        self.records: list[DNSRecord] = []
        self.learned: list[tuple[str, str, list[str], float]] = []
        self.delay = 0.0
        self.origs: list[tuple[str, int]] = []

        def upstream(orig: tuple[str, int]) -> tuple[str, int]:
            self.origs.append(orig)
            return ("127.0.0.1", upstream_port)

        async def hook(ep: str, name: str, ips: list[str]) -> None:
            await asyncio.sleep(self.delay)
            self.learned.append((ep, name, ips, time.monotonic()))

        self.caches = CacheStore(tmp / "fqdn.json", min_ttl=int(cfg.pop("min_ttl", 0)))
        self.proxy = DNSProxy(self.caches, config=ProxyConfig(upstream=upstream, **cfg),  # type: ignore[arg-type]
                              on_learned=hook, on_record=self.records.append)
        self.proxy.set_rules("127.0.0.1", DNSRuleSet(("*.example.com.",)))


def _run(harness: Harness, client, host: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    """Start the proxy, run the blocking client on a thread, stop."""
    async def main():  # type: ignore[no-untyped-def]
        _, port = await harness.proxy.start(host, 0)
        try:
            return await asyncio.to_thread(client, port)
        finally:
            await harness.proxy.stop()
    return asyncio.run(main())


def test_allowed_name_is_forwarded_learned_and_held_until_the_hook_ran(
        dnsmasq: int, tmp_path: Path) -> None:
    h = Harness(dnsmasq, tmp_path)
    h.delay = 0.03

    def client(port: int) -> tuple[Wire, float]:
        ans = _udp("api.example.com", port)
        return ans, time.monotonic()

    ans, got = _run(h, client)
    assert ans.header.rcode == RCODE.NOERROR
    assert [str(r.rdata) for r in ans.rr] == ["198.51.100.10"]
    # the datapath hook completed before the pod saw the answer
    (ep, name, ips, done), = h.learned
    assert (ep, name, ips) == ("127.0.0.1", "api.example.com.", ["198.51.100.10"])
    assert done <= got
    assert h.proxy.stats.hold_timeouts == 0
    entry = h.caches.for_endpoint("127.0.0.1").lookup("api.example.com.")["198.51.100.10"]
    assert entry.ttl == 30
    req, resp = h.records
    assert (req.kind, req.verdict, req.query, req.qtypes) == ("REQUEST", "FORWARDED",
                                                               "api.example.com.", ["A"])
    assert (resp.kind, resp.ips, resp.ttl, resp.rcode, resp.rrtypes) == (
        "RESPONSE", ["198.51.100.10"], 30, 0, ["A"])
    flow = resp.to_flow()
    assert flow["Type"] == "L7" and flow["l7"]["type"] == "RESPONSE"
    assert flow["l7"]["dns"]["ips"] == ["198.51.100.10"] and flow["l7"]["latency_ns"] > 0
    # persisted on stop: a new store reads the cache back (restart)
    again = CacheStore(tmp_path / "fqdn.json")
    assert again.load() == 1
    assert again.names_of("198.51.100.10") == ["api.example.com."]


def test_disallowed_name_is_refused_and_not_forwarded(dnsmasq: int, tmp_path: Path) -> None:
    h = Harness(dnsmasq, tmp_path)
    ans = _run(h, lambda port: _udp("evil.org", port))
    assert ans.header.rcode == RCODE.REFUSED
    assert h.origs == [] and h.learned == []
    (req,) = h.records
    assert (req.verdict, req.query) == ("DROPPED", "evil.org.")
    assert h.proxy.stats.refused == 1


def test_reject_code_name_error(dnsmasq: int, tmp_path: Path) -> None:
    h = Harness(dnsmasq, tmp_path, reject_rcode="nameError")
    ans = _run(h, lambda port: _udp("evil.org", port))
    assert ans.header.rcode == RCODE.NXDOMAIN
    with pytest.raises(ValueError, match="refused or nameError"):
        ProxyConfig(reject_rcode="servfail")


def test_tcp_queries(dnsmasq: int, tmp_path: Path) -> None:
    h = Harness(dnsmasq, tmp_path)
    ans = _run(h, lambda port: (_tcp("api.example.com", port), _tcp("evil.org", port)))
    assert [str(r.rdata) for r in ans[0].rr] == ["198.51.100.10"]
    assert ans[1].header.rcode == RCODE.REFUSED
    assert {r.protocol for r in h.records} == {"TCP"}


def test_hold_times_out_and_is_counted(dnsmasq: int, tmp_path: Path) -> None:
    h = Harness(dnsmasq, tmp_path, hold=0.1)
    h.delay = 1.0

    def client(port: int) -> float:
        t0 = time.monotonic()
        _udp("api.example.com", port)
        return time.monotonic() - t0

    took = _run(h, client)
    assert took < 0.9           # released after the hold, not after the slow hook
    assert h.proxy.stats.hold_timeouts == 1


def test_min_ttl_stretches_short_ttls(dnsmasq: int, tmp_path: Path) -> None:
    h = Harness(dnsmasq, tmp_path, min_ttl=60)
    _run(h, lambda port: _udp("short.example.com", port))
    entry = h.caches.for_endpoint("127.0.0.1").lookup("short.example.com.")["198.51.100.11"]
    assert entry.ttl == 60


@pytest.mark.skipif(os.geteuid() != 0, reason="binding 127.0.0.2 needs no root, but "
                    "IP_TRANSPARENT does")
def test_original_destination_and_transparent_reply(dnsmasq: int, tmp_path: Path) -> None:
    """The datagram's original destination (IP_RECVORIGDSTADDR) is where the query
    goes, and the answer comes back from that address."""
    h = Harness(dnsmasq, tmp_path, transparent=True)

    def client(port: int) -> tuple[Wire, tuple[str, int]]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(Wire.question("api.example.com").pack(), ("127.0.0.2", port))
            data, peer = s.recvfrom(4096)
        return Wire.parse(data), peer

    ans, peer = _run(h, client, host="0.0.0.0")
    assert ans.header.rcode == RCODE.NOERROR
    assert h.origs[0][0] == "127.0.0.2"
    assert peer == h.origs[0]


def test_name_manager_labels_only_selected_names() -> None:
    applied: list[tuple[dict, list]] = []

    async def apply(changed: dict, removed: list) -> None:
        applied.append((changed, removed))

    async def main() -> None:
        nm = NameManager(apply, ["*.example.com"])
        assert await nm.learned("api.example.com.", ["198.51.100.10"]) == 1
        assert await nm.learned("evil.org.", ["203.0.113.66"]) == 0     # stays world
        assert await nm.learned("api.example.com.", ["198.51.100.10"]) == 0  # no change
        await nm.set_patterns(["*.example.com", "evil.org"])
        await nm.forget("198.51.100.10")
    asyncio.run(main())
    (first, _), (second, _), (_, removed) = applied
    labels = {str(lbl).rstrip("=") for lbl in first["198.51.100.10"]}
    assert labels == {"cidr:198.51.100.10/32", "reserved:world", "fqdn:*.example.com."}
    assert list(second) == ["203.0.113.66"]
    assert removed == ["198.51.100.10"]


def test_a_query_of_an_unknown_endpoint_waits_briefly_for_its_rules(
        dnsmasq: int, tmp_path: Path) -> None:
    """The datapath redirects as soon as the maps are written; the rules follow in the
    agent's next snapshot: a query in between waits for them (bounded) instead of being
    refused, and an endpoint that stays unknown is refused after the wait."""
    h = Harness(dnsmasq, tmp_path, unknown_endpoint_wait=2.0)
    h.proxy.replace_rules({})

    async def main() -> tuple[Wire, float, Wire, float]:
        _, port = await h.proxy.start("127.0.0.1", 0)
        try:
            t0 = time.monotonic()
            pending = asyncio.create_task(asyncio.to_thread(_udp, "api.example.com", port))
            await asyncio.sleep(0.2)
            h.proxy.replace_rules({"127.0.0.1": DNSRuleSet(("*.example.com.",))})
            first = await pending
            waited = time.monotonic() - t0
            h.proxy.config.unknown_endpoint_wait = 0.1
            h.proxy.replace_rules({})
            t1 = time.monotonic()
            refused = await asyncio.to_thread(_udp, "api.example.com", port)
            return first, waited, refused, time.monotonic() - t1
        finally:
            await h.proxy.stop()

    first, waited, refused, refused_after = asyncio.run(main())
    assert first.header.rcode == RCODE.NOERROR and 0.2 <= waited < 2.0
    assert refused.header.rcode == RCODE.REFUSED and refused_after >= 0.1
