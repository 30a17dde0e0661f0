"""The exact contract between policy entries and the kernel's policy map.

The kernel map is an LPM trie keyed ``{endpoint id (32), remote identity (32),
direction (8), protocol (8), dport (16, network order)}``; a key's prefix length is
``72`` (endpoint, identity, direction) plus ``8 + port_prefix_bits`` when the protocol
is not the wildcard 0. Per packet the datapath does two lookups, one with the peer's
identity (A) and one with identity 0 (B), and takes the longest match of each:

* A or B is a deny              → drop, reason 181 (POLICY_DENY)
* A or B exists (allow)         → pass, cookie of A if present else B
* neither, direction enforced   → drop, reason 133 (POLICY_DENIED)
* neither, not enforced         → pass

Because each lookup returns only its *longest* match, an allow key narrower than a
deny key of the same identity would hide that deny (TCP/80 allow inside an
"everything" deny). :func:`compute_map_state` therefore prunes every allow covered by a
deny of the same identity and direction; denies of identity 0 need no pruning since
lookup B sees them anyway. :func:`datapath_verdict` emulates the kernel so tests can
check what the datapath will do without loading it.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from villi.policy.entry import PolicyEntry, Protocol

DROP_POLICY_DENIED = 133
DROP_POLICY_DENY = 181

#: Bits of the key before the protocol: endpoint id, identity, direction.
STATIC_PREFIX_BITS = 32 + 32 + 8
#: Protocols ``ANY`` expands to when a port is given (Cilium: TCP, UDP, SCTP).
L4_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


@dataclass(frozen=True, slots=True, order=True)
class MapKey:
    """One policy-map key without the endpoint id (each endpoint has its own rows).

    ``prefix_bits`` is the number of leading dport bits that must match (0..16). With
    ``protocol == 0`` both port and prefix_bits are 0; ``port`` is always masked.
    """

    identity: int
    direction: int
    protocol: int = 0
    port: int = 0
    prefix_bits: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_bits <= 16:
            raise ValueError(f"prefix_bits {self.prefix_bits} out of range 0..16")
        if self.protocol == 0:
            object.__setattr__(self, "port", 0)
            object.__setattr__(self, "prefix_bits", 0)
        else:
            object.__setattr__(self, "port", self.port & _mask(self.prefix_bits))

    @property
    def lpm_prefixlen(self) -> int:
        """The LPM trie prefix length of this key (endpoint id bits included)."""
        if self.protocol == 0:
            return STATIC_PREFIX_BITS
        return STATIC_PREFIX_BITS + 8 + self.prefix_bits

    def matches(self, protocol: int, port: int) -> bool:
        """Whether a packet with ``protocol``/``port`` falls under this key."""
        if self.protocol == 0:
            return True
        return self.protocol == protocol and port & _mask(self.prefix_bits) == self.port


@dataclass(frozen=True, slots=True)
class MapValue:
    deny: bool = False
    cookie: int = 0
    #: allowed traffic goes through the node's HTTP proxy (L7 rules on this key)
    redirect: bool = False
    #: ... through its DNS proxy instead (``rules.dns``; only with ``redirect``)
    dns: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    drop_reason: int = 0
    cookie: int = 0
    redirect: bool = False


MapState = dict[MapKey, MapValue]


def _mask(bits: int) -> int:
    return (0xFFFF << (16 - bits)) & 0xFFFF


def port_range_to_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The minimal list of aligned ``(port, prefix_bits)`` blocks covering ``lo..hi``.

    ``(0, 0)`` (a single /0 block) stands for "any port"; a range ``0..0`` means that.
    """
    if lo == 0 and hi == 0:
        return [(0, 0)]
    if not 0 <= lo <= hi <= 0xFFFF:
        raise ValueError(f"invalid port range {lo}..{hi}")
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


def entry_keys(entry: PolicyEntry) -> list[MapKey]:
    """The map keys one entry expands to (protocol ANY with ports → TCP, UDP, SCTP)."""
    return list(_keys(entry.identity, entry.direction, entry.protocol, entry.port,
                      entry.end_port))


@functools.lru_cache(maxsize=1 << 17)
def _keys(identity: int, direction: int, protocol: int, port: int,
          end_port: int) -> tuple[MapKey, ...]:
    """Cached: endpoints share most (identity, port) rows, and keys are immutable."""
    identity, direction, protocol = int(identity), int(direction), int(protocol)
    any_port = port == 0 and end_port == 0
    if protocol == Protocol.ANY and any_port:
        return (MapKey(identity, direction),)
    protocols = L4_PROTOCOLS if protocol == Protocol.ANY else (protocol,)
    blocks = port_range_to_prefixes(port, end_port or port) if not any_port else [(0, 0)]
    return tuple(MapKey(identity, direction, int(proto), p, bits)
                 for proto in protocols for p, bits in blocks)


def _covers(deny: MapKey, allow: MapKey) -> bool:
    if deny.protocol == 0:
        return True
    if deny.protocol != allow.protocol or deny.prefix_bits > allow.prefix_bits:
        return False
    return allow.port & _mask(deny.prefix_bits) == deny.port


@functools.lru_cache(maxsize=1 << 14)
def _value(deny: bool, cookie: int, redirect: bool = False, dns: bool = False) -> MapValue:
    return MapValue(deny, cookie, redirect, dns and redirect)


def _wins(new: MapValue, old: MapValue) -> bool:
    """Which of two values for one key is kept: deny, then a plain allow over an L7
    redirect (Cilium: an L4 allow without L7 on the same port wins), then the lower
    cookie (so the result does not depend on iteration order)."""
    if new.deny != old.deny:
        return new.deny
    if new.redirect != old.redirect:
        return not new.redirect
    return new.cookie < old.cookie


def compute_map_state(entries: Collection[PolicyEntry]) -> MapState:
    """Encode entries as map rows: deny wins a shared key; covered allows are pruned.

    Two allows (or two denies) on one key keep the lower cookie so the result does not
    depend on iteration order; an allow without L7 rules beats an L7 redirect.
    """
    if len(entries) == 1:  # the common case: one entry per (identity, direction)
        (entry,) = entries
        return dict.fromkeys(_keys(entry.identity, entry.direction, entry.protocol,
                                   entry.port, entry.end_port),
                             _value(entry.deny, entry.cookie, entry.redirect, entry.dns))
    state: MapState = {}
    get = state.get
    any_deny = False
    for entry in entries:
        deny = entry.deny
        value = _value(deny, entry.cookie, entry.redirect, entry.dns)
        any_deny = any_deny or deny
        for key in _keys(entry.identity, entry.direction, entry.protocol, entry.port,
                         entry.end_port):
            old = get(key)
            if old is None or _wins(value, old):
                state[key] = value
    if not any_deny:
        return state
    denies: dict[tuple[int, int], list[MapKey]] = {}
    for key, value in state.items():
        if value.deny:
            denies.setdefault((key.identity, key.direction), []).append(key)
    pruned = [key for key, value in state.items()
              if not value.deny and (group := denies.get((key.identity, key.direction)))
              and any(_covers(d, key) for d in group)]
    for key in pruned:
        del state[key]
    return state


def _longest(state: Mapping[MapKey, MapValue], identity: int, direction: int, protocol: int,
             port: int) -> MapValue | None:
    best: MapKey | None = None
    for key in state:
        if key.identity == identity and key.direction == direction and key.matches(
                protocol, port) and (best is None or key.lpm_prefixlen > best.lpm_prefixlen):
            best = key
    return state[best] if best is not None else None


def datapath_verdict(
    state: Mapping[MapKey, MapValue],
    *,
    ingress_or_egress_enforced: bool,
    identity: int,
    direction: int,
    protocol: int,
    port: int,
) -> Verdict:
    """What the kernel decides for one packet (ICMP: protocol 1, port = ICMP type)."""
    a = _longest(state, identity, direction, protocol, port) if identity != 0 else None
    b = _longest(state, 0, direction, protocol, port)
    for hit in (a, b):
        if hit is not None and hit.deny:
            return Verdict(False, DROP_POLICY_DENY, hit.cookie)
    if a is not None or b is not None:
        hit = a if a is not None else b
        assert hit is not None
        return Verdict(True, 0, hit.cookie, hit.redirect)
    if ingress_or_egress_enforced:
        return Verdict(False, DROP_POLICY_DENIED, 0)
    return Verdict(True, 0, 0)


def diff_map_state(old: Mapping[MapKey, MapValue],
                   new: Mapping[MapKey, MapValue]) -> tuple[MapState, set[MapKey]]:
    """Rows to write (new or changed) and keys to delete, to turn ``old`` into ``new``."""
    upsert = {key: value for key, value in new.items() if old.get(key) != value}
    delete = {key for key in old if key not in new}
    return upsert, delete


class EndpointMapState:
    """A map state kept up to date from entry diffs, recomputing only touched groups.

    Deny-wins and pruning only ever compare keys of the same (identity, direction), so
    each such group can be recomputed alone: a policy change that touches three
    identities costs three small recomputations, not a rebuild of the whole map. The
    rows are stored once (``state``); a group's previous rows are derived from its
    previous entries when it changes.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, int], set[PolicyEntry]] = {}
        self.state: MapState = {}

    def entries(self) -> frozenset[PolicyEntry]:
        """The entries this map state was computed from (the realized policy)."""
        out: set[PolicyEntry] = set()
        for members in self._groups.values():
            out |= members
        return frozenset(out)

    def apply(self, added: Collection[PolicyEntry],
              removed: Collection[PolicyEntry]) -> tuple[MapState, set[MapKey]]:
        """Apply an entry diff; returns the map diff (upserts, deletes)."""
        groups = self._groups
        if not groups and not removed:
            return self._fill(added)
        touched: dict[tuple[int, int], set[MapKey]] = {}
        for entry in (*removed, *added):
            group = (int(entry.identity), int(entry.direction))
            if group not in touched:
                old_keys: set[MapKey] = set()
                for member in groups.get(group, ()):
                    old_keys.update(_keys(member.identity, member.direction,
                                          member.protocol, member.port, member.end_port))
                touched[group] = old_keys
        for entry in removed:
            members = groups.get((int(entry.identity), int(entry.direction)))
            if members is not None:
                members.discard(entry)
        for entry in added:
            groups.setdefault((int(entry.identity), int(entry.direction)), set()).add(entry)
        state = self.state
        upserts: MapState = {}
        deletes: set[MapKey] = set()
        for group, old_keys in touched.items():
            members = groups.get(group)
            new = compute_map_state(members) if members else {}
            if not members:
                groups.pop(group, None)
            for key in old_keys:
                if key not in new and key in state:
                    del state[key]
                    deletes.add(key)
            for key, value in new.items():
                if state.get(key) != value:
                    state[key] = value
                    upserts[key] = value
        return upserts, deletes

    def _fill(self, added: Collection[PolicyEntry]) -> tuple[MapState, set[MapKey]]:
        """First fill of an empty state: one pass, no per-group diffing."""
        groups = self._groups
        for entry in added:
            groups.setdefault((int(entry.identity), int(entry.direction)), set()).add(entry)
        self.state = compute_map_state(added)
        return dict(self.state), set()
