"""Per-endpoint DNS caches: TTLs, min TTL, the per-name IP limit, zombies kept while the
datapath has a live connection, persistence, and the fqdn-cache listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from villi.dnsproxy.cache import CacheStore, DNSCache, collect


def test_ttl_expiry_turns_ips_into_zombies_released_when_dead() -> None:
    c = DNSCache()
    assert c.update("a.com.", [("1.1.1.1", 10)], now=0) == ["1.1.1.1"]
    assert c.update("a.com.", [("1.1.1.1", 10)], now=1) == []   # known: nothing new
    assert c.expire(now=5) == []
    assert [e.ip for e in c.expire(now=11)] == ["1.1.1.1"]
    assert c.allowed_ips() == {"1.1.1.1"}                        # a zombie, still allowed
    assert c.collect_zombies(lambda ip: True) == []              # live connection: kept
    assert [z.ip for z in c.collect_zombies(lambda ip: False)] == ["1.1.1.1"]
    assert c.allowed_ips() == set()


def test_relearned_zombie_comes_back_alive() -> None:
    c = DNSCache()
    c.update("a.com.", [("1.1.1.1", 1)], now=0)
    c.expire(now=2)
    c.update("a.com.", [("1.1.1.1", 30)], now=3)
    assert c.zombies == {}
    assert c.lookup("a.com.")["1.1.1.1"].expires == 33


def test_min_ttl_and_per_name_limit() -> None:
    c = DNSCache(min_ttl=60, max_ips_per_name=2)
    c.update("a.com.", [("1.0.0.1", 1)], now=0)
    c.update("a.com.", [("1.0.0.2", 100)], now=0)
    c.update("a.com.", [("1.0.0.3", 200)], now=0)
    assert sorted(c.lookup("a.com.")) == ["1.0.0.2", "1.0.0.3"]
    assert c.lookup("a.com.")["1.0.0.2"].ttl == 100
    assert set(c.zombies) == {"1.0.0.1"}    # the oldest went to the zombies
    with pytest.raises(ValueError):
        DNSCache(max_ips_per_name=0)


def test_ip_shared_by_two_names_is_not_buried_while_one_holds_it() -> None:
    c = DNSCache()
    c.update("a.com.", [("1.1.1.1", 1)], now=0)
    c.update("b.com.", [("1.1.1.1", 100)], now=0)
    c.expire(now=5)
    assert c.zombies == {} and c.names_of("1.1.1.1") == ["b.com."]


def test_store_persists_lists_and_collects(tmp_path: Path) -> None:
    s = CacheStore(tmp_path / "c.json")
    s.for_endpoint("10.64.1.5").update("a.com.", [("1.1.1.1", 10)], now=100)
    s.for_endpoint("10.64.1.6").update("b.com.", [("2.2.2.2", 1)], now=100)
    s.save()
    r = CacheStore(tmp_path / "c.json")
    assert r.load() == 2
    rows = r.listing(now=104)
    assert [(x["endpoint"], x["name"], x["ip"], x["ttl_left"], x["source"]) for x in rows] \
        == [("10.64.1.5", "a.com.", "1.1.1.1", 6, "restore"),
            ("10.64.1.6", "b.com.", "2.2.2.2", 0, "restore")]
    alive = {("10.64.1.6", "2.2.2.2")}
    assert collect(r, lambda ep, ip: (ep, ip) in alive, now=105) == []
    assert r.listing(now=105)[-1]["source"] == "zombie"
    alive.clear()
    assert collect(r, lambda ep, ip: False, now=106) == [("10.64.1.6", "2.2.2.2", ["b.com."])]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="unreadable"):
        CacheStore(tmp_path / "bad.json").load()
