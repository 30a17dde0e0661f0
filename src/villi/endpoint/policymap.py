"""Write an endpoint's policy map state into the kernel's policy LPM trie, as a diff.

The policy engine hands over the map state it computed (``villi.policy.mapstate``:
keys with identity, direction, protocol, port prefix; values with deny flag and rule
cookie). This module encodes those keys for the kernel and changes only what differs
from what is already there, in an order that never opens a window where traffic is
allowed that neither the old nor the new policy allows: new denies first, then new
allows, then removals.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from typing import Protocol

from villi.datapath import abi
from villi.datapath.maps import TypedMap


class MapKeyLike(Protocol):
    identity: int
    direction: int
    protocol: int
    port: int
    prefix_bits: int


class MapValueLike(Protocol):
    deny: bool
    cookie: int


def match_type(key: MapKeyLike) -> int:
    """Hubble's match type from the shape of the key."""
    port_specific = key.protocol != 0
    if key.identity:
        return abi.MatchType.L3_L4 if port_specific else abi.MatchType.L3_ONLY
    return abi.MatchType.L4_ONLY if port_specific else abi.MatchType.ALL


def kernel_key(endpoint_id: int, key: MapKeyLike) -> abi.PolicyKey:
    if key.protocol == 0:
        return abi.PolicyKey(prefixlen=abi.POLICY_STATIC_PREFIX, endpoint_id=endpoint_id,
                             identity=key.identity, direction=key.direction)
    return abi.PolicyKey(prefixlen=abi.POLICY_STATIC_PREFIX + 8 + key.prefix_bits,
                         endpoint_id=endpoint_id, identity=key.identity,
                         direction=key.direction, protocol=key.protocol,
                         dport=socket.htons(key.port))


def proxy_port(key: MapKeyLike, value: MapValueLike) -> int:
    """The node proxy listener an L7 entry redirects to (by the key's direction)."""
    if value.deny or not getattr(value, "redirect", False):  # L3/L4-only value types
        return 0
    if getattr(value, "dns", False):
        return abi.PROXY_DNS_PORT
    if key.direction == abi.Dir.INGRESS:
        return abi.PROXY_INGRESS_PORT
    return abi.PROXY_EGRESS_PORT


def kernel_value(key: MapKeyLike, value: MapValueLike) -> abi.PolicyValue:
    return abi.PolicyValue(deny=1 if value.deny else 0, match_type=match_type(key),
                           proxy_port=proxy_port(key, value), cookie=value.cookie)


def apply_diff(
    policy_map: TypedMap[abi.PolicyKey, abi.PolicyValue],
    endpoint_id: int,
    old: Mapping[MapKeyLike, MapValueLike],
    new: Mapping[MapKeyLike, MapValueLike],
) -> tuple[int, int]:
    """Make the kernel hold ``new`` where it held ``old``; returns (written, deleted)."""
    changed = [(k, v) for k, v in new.items() if old.get(k) != v]
    denies = [(k, v) for k, v in changed if v.deny]
    allows = [(k, v) for k, v in changed if not v.deny]
    for k, v in denies + allows:
        policy_map.update(kernel_key(endpoint_id, k), kernel_value(k, v))
    removed = [k for k in old if k not in new]
    for k in removed:
        policy_map.delete(kernel_key(endpoint_id, k))
    return len(changed), len(removed)


def apply_changes(
    policy_map: TypedMap[abi.PolicyKey, abi.PolicyValue],
    endpoint_id: int,
    upserts: Mapping[MapKeyLike, MapValueLike],
    deletes: Iterable[MapKeyLike],
) -> tuple[int, int]:
    """Write a precomputed diff: denies, then allows, then removals."""
    ordered = sorted(upserts.items(), key=lambda kv: not kv[1].deny)
    for k, v in ordered:
        policy_map.update(kernel_key(endpoint_id, k), kernel_value(k, v))
    n = 0
    for k in deletes:
        n += policy_map.delete(kernel_key(endpoint_id, k))
    return len(ordered), n


def delete_all(policy_map: TypedMap[abi.PolicyKey, abi.PolicyValue], endpoint_id: int) -> int:
    """Remove every entry of one endpoint (walks the whole trie: endpoint deletion only)."""
    n = 0
    for key in policy_map.keys():
        if key.endpoint_id == endpoint_id:
            n += policy_map.delete(key)
    return n
