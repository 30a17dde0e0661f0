"""The kernel contract: keys, port-range prefixes, deny precedence, shadow pruning and the
emulated two-lookup verdict."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from villi.identity.ids import IdentityID
from villi.policy.entry import Direction, PolicyEntry, Protocol
from villi.policy.mapstate import (
    DROP_POLICY_DENIED,
    DROP_POLICY_DENY,
    EndpointMapState,
    MapKey,
    MapValue,
    compute_map_state,
    datapath_verdict,
    diff_map_state,
    entry_keys,
    port_range_to_prefixes,
)

IN, OUT = Direction.INGRESS, Direction.EGRESS
TCP, UDP, SCTP, ICMP, ANY = Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP, Protocol.ANY


def entry(identity: int, proto: Protocol = ANY, port: int = 0, end: int = 0, *,
          deny: bool = False, cookie: int = 7, direction: Direction = IN) -> PolicyEntry:
    return PolicyEntry(IdentityID(identity), direction, proto, port, end, deny, cookie)


def verdict(state: dict, identity: int, proto: int, port: int, *, enforced: bool = True,
            direction: Direction = IN) -> tuple[bool, int, int]:
    v = datapath_verdict(state, ingress_or_egress_enforced=enforced, identity=identity,
                         direction=int(direction), protocol=int(proto), port=port)
    return v.allowed, v.drop_reason, v.cookie


# -- keys and prefixes ----------------------------------------------------------------------


def test_map_key_normalises_wildcards_and_masks_ports() -> None:
    assert MapKey(5, 0, 0, 80, 16) == MapKey(5, 0)
    assert MapKey(5, 0, 6, 0x1234, 8).port == 0x1200
    assert MapKey(5, 0).lpm_prefixlen == 72
    assert MapKey(5, 0, 6, 0, 0).lpm_prefixlen == 80
    assert MapKey(5, 0, 6, 80, 16).lpm_prefixlen == 96
    with pytest.raises(ValueError):
        MapKey(5, 0, 6, 80, 17)


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (0, 0, [(0, 0)]),
    (0, 65535, [(0, 0)]),
    (80, 80, [(80, 16)]),
    (80, 81, [(80, 15)]),
    (1, 65535, [(1, 16), (2, 15), (4, 14), (8, 13), (16, 12), (32, 11), (64, 10), (128, 9),
                (256, 8), (512, 7), (1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2),
                (32768, 1)]),
    (8000, 8100, [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]),
    (1024, 2047, [(1024, 6)]),
])
def test_port_range_to_prefixes(lo: int, hi: int, expected: list[tuple[int, int]]) -> None:
    assert port_range_to_prefixes(lo, hi) == expected


@settings(max_examples=300, derandomize=True)
@given(st.integers(1, 65535), st.integers(0, 65535))
def test_port_range_cover_is_exact_and_minimal(lo: int, span: int) -> None:
    hi = min(65535, lo + span)
    blocks = port_range_to_prefixes(lo, hi)
    covered = set()
    for port, bits in blocks:
        size = 1 << (16 - bits)
        assert port % size == 0  # aligned
        covered |= set(range(port, port + size))
    assert covered == set(range(lo, hi + 1))
    # minimal: no two blocks could merge into one aligned block
    for (a, abits), (b, bbits) in zip(blocks, blocks[1:], strict=False):
        if abits == bbits:
            size = 1 << (16 - abits)
            assert not (a % (2 * size) == 0 and b == a + size)


def test_protocol_any_expands_only_with_ports() -> None:
    assert entry_keys(entry(9)) == [MapKey(9, 0)]
    keys = entry_keys(entry(9, ANY, 53))
    assert {k.protocol for k in keys} == {6, 17, 132} and {k.port for k in keys} == {53}
    assert entry_keys(entry(9, TCP)) == [MapKey(9, 0, 6, 0, 0)]
    assert entry_keys(entry(9, UDP, 80, 81)) == [MapKey(9, 0, 17, 80, 15)]
    assert entry_keys(entry(9, ICMP, 8)) == [MapKey(9, 0, 1, 8, 16)]


# -- compute_map_state ------------------------------------------------------------------------


def test_deny_wins_a_shared_key_and_cookies_are_deterministic() -> None:
    allow = entry(9, TCP, 80, cookie=3)
    deny = entry(9, TCP, 80, deny=True, cookie=4)
    for order in ([allow, deny], [deny, allow]):
        assert compute_map_state(order) == {MapKey(9, 0, 6, 80, 16): MapValue(True, 4)}
    two = compute_map_state([entry(9, cookie=8), entry(9, cookie=5)])
    assert two == {MapKey(9, 0): MapValue(False, 5)}


def test_allow_covered_by_same_identity_deny_is_pruned() -> None:
    state = compute_map_state([entry(9, TCP, 80), entry(9, deny=True, cookie=2)])
    assert state == {MapKey(9, 0): MapValue(True, 2)}
    state = compute_map_state([entry(9, TCP, 80), entry(9, TCP, 0, deny=True)])
    assert list(state) == [MapKey(9, 0, 6, 0, 0)]
    state = compute_map_state([entry(9, TCP, 80, 81), entry(9, TCP, 80, 83, deny=True)])
    assert all(v.deny for v in state.values())


def test_broader_allow_with_narrower_deny_is_kept() -> None:
    state = compute_map_state([entry(9), entry(9, TCP, 80, deny=True, cookie=2)])
    assert state[MapKey(9, 0)] == MapValue(False, 7)
    assert verdict(state, 9, TCP, 80) == (False, DROP_POLICY_DENY, 2)
    assert verdict(state, 9, TCP, 81) == (True, 0, 7)
    assert verdict(state, 9, UDP, 80) == (True, 0, 7)


def test_pruning_is_per_identity_and_direction() -> None:
    state = compute_map_state([entry(9, TCP, 80), entry(10, deny=True),
                               entry(9, TCP, 80, direction=OUT, deny=True)])
    assert MapKey(9, 0, 6, 80, 16) in state


def test_identity_zero_deny_needs_no_pruning_the_second_lookup_sees_it() -> None:
    state = compute_map_state([entry(9, TCP, 80), entry(0, deny=True, cookie=2)])
    assert MapKey(9, 0, 6, 80, 16) in state
    assert verdict(state, 9, TCP, 80) == (False, DROP_POLICY_DENY, 2)


# -- datapath_verdict -------------------------------------------------------------------------


def test_verdict_lookup_order() -> None:
    state = compute_map_state([entry(9, TCP, 80, cookie=1), entry(0, UDP, 53, cookie=2)])
    assert verdict(state, 9, TCP, 80) == (True, 0, 1)
    assert verdict(state, 10, UDP, 53) == (True, 0, 2)
    assert verdict(state, 9, UDP, 53) == (True, 0, 2)
    assert verdict(state, 9, TCP, 81) == (False, DROP_POLICY_DENIED, 0)
    assert verdict(state, 9, TCP, 81, enforced=False) == (True, 0, 0)
    assert verdict(state, 9, TCP, 80, direction=OUT) == (False, DROP_POLICY_DENIED, 0)


def test_specific_identity_cookie_is_preferred() -> None:
    state = compute_map_state([entry(9, cookie=1), entry(0, cookie=2)])
    assert verdict(state, 9, TCP, 1) == (True, 0, 1)
    assert verdict(state, 8, TCP, 1) == (True, 0, 2)


def test_deny_in_a_non_enforced_direction_still_drops() -> None:
    state = compute_map_state([entry(9, deny=True, cookie=4)])
    assert verdict(state, 9, TCP, 1, enforced=False) == (False, DROP_POLICY_DENY, 4)
    assert verdict(state, 8, TCP, 1, enforced=False) == (True, 0, 0)


def test_icmp_uses_type_as_port() -> None:
    state = compute_map_state([entry(9, ICMP, 8)])
    assert verdict(state, 9, ICMP, 8)[0]
    assert not verdict(state, 9, ICMP, 0)[0]
    assert not verdict(state, 9, TCP, 8)[0]


def _brute(entries: list[PolicyEntry], identity: int, proto: int, port: int,
           enforced: bool) -> tuple[bool, int]:
    """Semantics without the map: any matching deny drops, any matching allow passes."""
    def hit(e: PolicyEntry) -> bool:
        if e.identity not in (0, identity):
            return False
        if e.protocol == ANY and e.port == 0:
            return True
        if e.protocol == ANY and proto not in (6, 17, 132):
            return False
        if e.protocol not in (ANY, proto):
            return False
        return e.port == 0 or e.port <= port <= (e.end_port or e.port)
    matched = [e for e in entries if hit(e)]
    if any(e.deny for e in matched):
        return False, DROP_POLICY_DENY
    if matched or not enforced:
        return True, 0
    return False, DROP_POLICY_DENIED


ENTRY = st.builds(
    lambda ident, proto, port, span, deny: entry(ident, proto, port, port + span if port else 0,
                                                 deny=deny),
    st.sampled_from([0, 9, 10]), st.sampled_from([ANY, TCP, UDP, ICMP]),
    st.sampled_from([0, 0, 79, 80, 81, 1000]), st.sampled_from([0, 0, 1, 7, 300]),
    st.booleans())


@settings(max_examples=300, derandomize=True)
@given(st.lists(ENTRY, max_size=8), st.booleans())
def test_verdict_equals_entry_semantics(entries: list[PolicyEntry], enforced: bool) -> None:
    state = compute_map_state(entries)
    for identity in (9, 10, 11):
        for proto, port in [(6, 80), (6, 81), (17, 80), (6, 1000), (6, 1300), (1, 8), (1, 80),
                            (132, 79), (6, 87), (6, 88)]:
            got = verdict(state, identity, proto, port, enforced=enforced)
            assert got[:2] == _brute(entries, identity, proto, port, enforced)


# -- diffs ------------------------------------------------------------------------------------


def test_diff_map_state() -> None:
    old = {MapKey(1, 0): MapValue(), MapKey(2, 0): MapValue(), MapKey(3, 0): MapValue()}
    new = {MapKey(1, 0): MapValue(), MapKey(2, 0): MapValue(True, 1), MapKey(4, 0): MapValue()}
    upsert, delete = diff_map_state(old, new)
    assert upsert == {MapKey(2, 0): MapValue(True, 1), MapKey(4, 0): MapValue()}
    assert delete == {MapKey(3, 0)}


def test_endpoint_map_state_tracks_compute_map_state() -> None:
    rng = random.Random(7)
    pool = [entry(rng.choice([0, 9, 10]), rng.choice([ANY, TCP, UDP]), rng.choice([0, 80, 90]),
                  deny=rng.random() < 0.3, cookie=rng.randint(1, 3)) for _ in range(40)]
    live: set[PolicyEntry] = set()
    ems = EndpointMapState()
    realized: dict = {}
    for _ in range(200):
        added = {e for e in rng.sample(pool, 3) if e not in live}
        removed = set(rng.sample(sorted(live), min(2, len(live))))
        live = (live - removed) | added
        upsert, delete = ems.apply(added, removed)
        for key in delete:
            del realized[key]
        realized.update(upsert)
        assert realized == ems.state == compute_map_state(live)
