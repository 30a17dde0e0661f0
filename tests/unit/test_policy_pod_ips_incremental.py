"""Pod IPs reach ipBlock selections incrementally (issue 16).

At 350,000 pods of 3,000 identities every pod upsert used to rebuild its identity's
whole IP set and re-test every ipBlock selector against it (O(pods per identity)). Now
``SelectorCache.add_ip``/``remove_ip`` and the resolver's per-identity counts do O(1)
work per pod; these tests check they agree with the full recomputation, including the
change reports the resolver consumes.
"""

from __future__ import annotations

import random

from villi.identity.labels import pod_identity_labels
from villi.policy.resolver import PolicyResolver
from villi.policy.rules import CIDRSelector
from villi.policy.selectorcache import SelectorCache

BLOCKS = [CIDRSelector(frozenset({"10.64.0.0/16"}), pods=True),
          CIDRSelector(frozenset({"10.64.0.0/24", "10.65.0.0/24"}), pods=True),
          CIDRSelector(frozenset({"10.0.0.0/8"}), pods=True)]
IPS = [0x0A400001, 0x0A400101, 0x0A410001, 0x0A420005, 0x0B000001]


def test_add_and_remove_ip_agree_with_set_ips_and_report_the_same_changes() -> None:
    rng = random.Random(16)
    inc, full = SelectorCache(), SelectorCache()
    for cache in (inc, full):
        for b in BLOCKS:
            cache.add(b)
        cache.update_identities({i: pod_identity_labels("ns", {"app": f"a{i}"})
                                 for i in range(300, 306)})
    held: dict[int, set[int]] = {i: set() for i in range(300, 306)}
    for _ in range(2000):
        identity, ip = rng.randrange(300, 306), rng.choice(IPS)
        if ip in held[identity]:
            held[identity].discard(ip)
            got = inc.remove_ip(identity, ip)
        else:
            held[identity].add(ip)
            got = inc.add_ip(identity, ip)
        want = full.set_ips(identity, held[identity])
        norm = {s: c for s, c in got.items() if c[0] or c[1]}
        assert norm == {s: c for s, c in want.items() if c[0] or c[1]}
        for b in BLOCKS:
            assert inc.selections(b) == full.selections(b)


def test_resolver_counts_shared_ips_and_ports_across_pods() -> None:
    r = PolicyResolver()
    r.update_identities({300: pod_identity_labels("ns", {"app": "web"})}, [])
    block = BLOCKS[0]
    r.selectors.add(block)
    r.upsert_pod("ip:10.64.0.1", 300, ["10.64.0.1"], {"http": (80, 6)})
    r.upsert_pod("endpoint:7", 300, ["10.64.0.1"], {"http": (80, 6)})  # same IP twice
    assert r.selectors.selections(block) == {300}
    assert r._identity_ports[300] == {"http": {(80, 6)}}
    r.delete_pod("ip:10.64.0.1")            # the other record still holds IP and port
    assert r.selectors.selections(block) == {300}
    assert r._identity_ports[300] == {"http": {(80, 6)}}
    r.upsert_pod("ip:10.64.0.9", 300, ["11.0.0.9"], {})  # one IP outside the block
    assert r.selectors.selections(block) == set()
    r.delete_pod("ip:10.64.0.9")
    assert r.selectors.selections(block) == {300}
    r.delete_pod("endpoint:7")
    assert r.selectors.selections(block) == set()
    assert 300 not in r._identity_ports and 300 not in r._identity_ips
    # an unchanged record is a no-op; a re-upsert with a new port changes the ports
    r.upsert_pod("ip:10.64.0.2", 300, ["10.64.0.2"], {"http": (80, 6)})
    r.upsert_pod("ip:10.64.0.2", 300, ["10.64.0.2"], {"http": (8080, 6)})
    assert r._identity_ports[300] == {"http": {(8080, 6)}}
