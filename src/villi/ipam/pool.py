"""The node-local pod IP allocator (cluster-pool mode's host-scope allocator).

The operator gives the node one or more pod CIDRs; :class:`NodePool` hands out their
addresses to owners (opaque strings such as ``container-id:<id>/eth0`` or ``router``).

Choices, and why:

- Network and broadcast addresses are never handed out (as Cilium's host-scope
  allocator: a /24 holds 254 pod IPs).
- Next-fit order: the search starts after the last address handed out and wraps
  around, so an address released a moment ago is the last one to be reused. A new pod
  that got a just-freed IP would receive replies, conntrack state and policy verdicts
  still addressed to the old pod.
- ``allocate(owner)`` is idempotent: a CNI ADD that is retried after a timeout gets the
  same address instead of leaking one.
- Every change is written to ``<state_dir>/ipam.json`` (atomic rename, fsync) before the
  address is returned, together with the next-fit cursor; a restarted agent restores it
  and never hands out an address twice, nor re-uses one released just before the
  restart.
- The CIDR list is set by the operator. A CIDR that disappears from it while pods still
  use addresses in it is kept *draining*: those addresses stay allocated until
  released, nothing new comes from it, and it is dropped when its last address goes.

Methods are synchronous and thread-safe (one lock): the agent may call them directly
(a write is two fsyncs of a small file) or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from villi.errors import IPAMError, PoolExhausted
from villi.ipam._state import read_json, write_json_atomic
from villi.ipam.capacity import IPAMUsage
from villi.ipam.keys import check_node_name, parse_cidr

STATE_FILE = "ipam.json"
_STATE_VERSION = 1
#: Largest prefix length a pod CIDR may have: a /30 still has two usable addresses.
MAX_PREFIXLEN = 30


@dataclass(frozen=True, slots=True)
class Allocation:
    """One address held by one owner, and the pod CIDR it came from."""

    ip: IPv4Address
    owner: str
    cidr: IPv4Network


def _usable(cidr: IPv4Network) -> tuple[int, int]:
    """First and last assignable address of ``cidr`` as integers (inclusive)."""
    return int(cidr.network_address) + 1, int(cidr.broadcast_address) - 1


def _as_network(cidr: IPv4Network | str) -> IPv4Network:
    net = cidr if isinstance(cidr, IPv4Network) else parse_cidr(cidr)
    if net.prefixlen > MAX_PREFIXLEN:
        raise IPAMError(f"pod CIDR {net} is too small: use /{MAX_PREFIXLEN} or larger")
    return net


def _as_address(ip: IPv4Address | str) -> IPv4Address:
    if isinstance(ip, IPv4Address):
        return ip
    try:
        return IPv4Address(ip)
    except ValueError as exc:
        raise IPAMError(f"invalid IPv4 address {ip!r}: {exc}") from None


def _check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner:
        raise IPAMError(f"an allocation needs a non-empty owner, got {owner!r}")
    return owner


class NodePool:
    """Allocates pod IPv4s of ``node`` from its pod CIDRs; persisted in ``state_dir``.

    ``state_dir=None`` keeps everything in memory (tests, dry runs). With a state dir,
    the previous state is restored first; ``cidrs`` (when given) then replaces the CIDR
    list as :meth:`set_cidrs` does. A state file written for another node is refused.
    """

    def __init__(
        self,
        node: str,
        cidrs: Iterable[IPv4Network | str] | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.node = check_node_name(node)
        self.path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self._lock = threading.RLock()
        self._active: list[IPv4Network] = []
        self._draining: list[IPv4Network] = []
        self._owner_of: dict[int, str] = {}
        self._ip_of: dict[str, int] = {}
        self._cursor: int | None = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise IPAMError(f"cannot create IPAM state dir {self.path.parent}: "
                                f"{exc.strerror or exc}") from exc
            self._restore()
        if cidrs is not None:
            self.set_cidrs(cidrs)

    # --- CIDRs -----------------------------------------------------------------------------

    @property
    def cidrs(self) -> tuple[IPv4Network, ...]:
        """The CIDRs new addresses come from, in the order they were given."""
        with self._lock:
            return tuple(self._active)

    @property
    def draining(self) -> tuple[IPv4Network, ...]:
        """CIDRs no longer assigned to the node whose addresses are still in use."""
        with self._lock:
            return tuple(self._draining)

    def set_cidrs(self, cidrs: Iterable[IPv4Network | str]) -> None:
        """Make ``cidrs`` the node's pod CIDRs (the operator's list, order kept).

        CIDRs dropped from the list drain (see the module docstring). Overlapping CIDRs
        are refused: they would count the same addresses twice.
        """
        wanted: list[IPv4Network] = []
        for cidr in map(_as_network, cidrs):
            if cidr in wanted:
                continue
            clash = next((w for w in wanted if w.overlaps(cidr)), None)
            if clash is not None:
                raise IPAMError(f"pod CIDRs {clash} and {cidr} overlap (node {self.node})")
            wanted.append(cidr)
        with self._lock:
            old = (list(self._active), list(self._draining))
            if wanted == self._active:
                return
            gone = [c for c in self._active + self._draining if c not in wanted]
            self._active = wanted
            self._draining = [c for c in gone if self._count_in(c)]
            self._commit(old)

    def add_cidr(self, cidr: IPv4Network | str) -> None:
        """Append one CIDR (the operator handed the node more room)."""
        with self._lock:
            self.set_cidrs([*self._active, _as_network(cidr)])

    # --- allocation --------------------------------------------------------------------------

    def allocate(self, owner: str) -> Allocation:
        """An address for ``owner``: the one it already holds, else the next free one.

        Raises :class:`PoolExhausted` when no address is free (or no CIDR is assigned
        yet); both are transient, so the CNI plugin reports "try again later".
        """
        _check_owner(owner)
        with self._lock:
            held = self._ip_of.get(owner)
            if held is not None:
                return self._allocation(held, owner)
            usage = self._usage()
            if usage.free <= 0:
                raise PoolExhausted(self._exhausted_message(usage))
            ip = next(ip for ip in self._next_fit_order() if ip not in self._owner_of)
            old_cursor = self._cursor
            self._take(ip, owner)
            self._cursor = ip
            try:
                self._persist()
            except IPAMError:
                self._drop(ip)
                self._cursor = old_cursor
                raise
            return self._allocation(ip, owner)

    def allocate_specific(self, ip: IPv4Address | str, owner: str) -> Allocation:
        """Give ``ip`` to ``owner`` (endpoint restore, ``POST /ipam/{ip}``).

        Idempotent for the same owner; IPAMError when another owner holds ``ip``, when
        ``owner`` already holds a different address, or when ``ip`` is not assignable
        in the node's CIDRs. Does not move the next-fit cursor.
        """
        _check_owner(owner)
        addr = _as_address(ip)
        value = int(addr)
        with self._lock:
            holder = self._owner_of.get(value)
            if holder == owner:
                return self._allocation(value, owner)
            if holder is not None:
                raise IPAMError(f"{addr} is already allocated to {holder!r} on node {self.node}")
            held = self._ip_of.get(owner)
            if held is not None:
                raise IPAMError(f"{owner!r} already holds {IPv4Address(held)} on node "
                                f"{self.node}; release it first")
            cidr = self._cidr_of(value, self._active)
            if cidr is None:
                where = ", ".join(map(str, self._active)) or "no pod CIDR yet"
                raise IPAMError(f"{addr} is not in the pod CIDRs of node {self.node} ({where})")
            first, last = _usable(cidr)
            if not first <= value <= last:
                raise IPAMError(f"{addr} is the network or broadcast address of {cidr}")
            self._take(value, owner)
            try:
                self._persist()
            except IPAMError:
                self._drop(value)
                raise
            return self._allocation(value, owner)

    def release(self, ip: IPv4Address | str) -> Allocation | None:
        """Free ``ip``; returns what was released, None when it was not allocated
        (releasing twice is not an error: CNI DEL must be idempotent)."""
        value = int(_as_address(ip))
        with self._lock:
            owner = self._owner_of.get(value)
            if owner is None:
                return None
            return self._release(value, owner)

    def release_owner(self, owner: str) -> Allocation | None:
        """Free the address ``owner`` holds; None when it holds none."""
        with self._lock:
            value = self._ip_of.get(owner)
            if value is None:
                return None
            return self._release(value, owner)

    # --- queries -------------------------------------------------------------------------------

    def get(self, owner: str) -> Allocation | None:
        with self._lock:
            value = self._ip_of.get(owner)
            return None if value is None else self._allocation(value, owner)

    def owner_of(self, ip: IPv4Address | str) -> str | None:
        with self._lock:
            return self._owner_of.get(int(_as_address(ip)))

    def allocations(self) -> list[Allocation]:
        """Every allocation, by address."""
        with self._lock:
            return [self._allocation(v, self._owner_of[v]) for v in sorted(self._owner_of)]

    def usage(self) -> IPAMUsage:
        with self._lock:
            return self._usage()

    @property
    def capacity(self) -> int:
        return self.usage().capacity

    @property
    def used(self) -> int:
        return self.usage().allocated

    @property
    def free(self) -> int:
        return self.usage().free

    def __repr__(self) -> str:
        return f"NodePool({self.node}, {', '.join(map(str, self.cidrs)) or '-'}, {self.usage()})"

    # --- internals -----------------------------------------------------------------------------

    def _usage(self) -> IPAMUsage:
        active = sum(_usable(c)[1] - _usable(c)[0] + 1 for c in self._active)
        outside = sum(1 for v in self._owner_of if self._cidr_of(v, self._active) is None)
        return IPAMUsage(len(self._owner_of), active + outside)

    def _exhausted_message(self, usage: IPAMUsage) -> str:
        if not self._active:
            return (f"no free IPv4 on node {self.node}: no pod CIDR assigned yet "
                    "(the operator assigns one; is `villi operator` running?)")
        cidrs = ", ".join(map(str, self._active))
        return (f"no free IPv4 in {cidrs} ({usage.allocated}/{usage.capacity} allocated) "
                f"on node {self.node}")

    def _next_fit_order(self) -> Iterator[int]:
        """Every assignable address, starting right after the cursor, wrapping around."""
        ranges = [_usable(c) for c in self._active]
        start = 0
        after = None
        if self._cursor is not None:
            for i, (first, last) in enumerate(ranges):
                if first <= self._cursor <= last:
                    start, after = i, self._cursor
                    break
        ordered = ranges[start:] + ranges[:start]
        if after is not None:
            first, last = ordered[0]
            yield from range(after + 1, last + 1)
            for lo, hi in ordered[1:]:
                yield from range(lo, hi + 1)
            yield from range(first, after + 1)
        else:
            for lo, hi in ordered:
                yield from range(lo, hi + 1)

    @staticmethod
    def _cidr_of(value: int, cidrs: Sequence[IPv4Network]) -> IPv4Network | None:
        for cidr in cidrs:
            if int(cidr.network_address) <= value <= int(cidr.broadcast_address):
                return cidr
        return None

    def _count_in(self, cidr: IPv4Network) -> int:
        lo, hi = int(cidr.network_address), int(cidr.broadcast_address)
        return sum(1 for v in self._owner_of if lo <= v <= hi)

    def _allocation(self, value: int, owner: str) -> Allocation:
        cidr = self._cidr_of(value, self._active + self._draining)
        assert cidr is not None, "allocation outside every known CIDR"
        return Allocation(IPv4Address(value), owner, cidr)

    def _take(self, value: int, owner: str) -> None:
        self._owner_of[value] = owner
        self._ip_of[owner] = value

    def _drop(self, value: int) -> None:
        owner = self._owner_of.pop(value)
        del self._ip_of[owner]

    def _release(self, value: int, owner: str) -> Allocation:
        released = self._allocation(value, owner)
        old = (list(self._active), list(self._draining))
        self._drop(value)
        self._draining = [c for c in self._draining if self._count_in(c)]
        try:
            self._persist()
        except IPAMError:
            self._take(value, owner)
            self._active, self._draining = old
            raise
        return released

    def _commit(self, old: tuple[list[IPv4Network], list[IPv4Network]]) -> None:
        try:
            self._persist()
        except IPAMError:
            self._active, self._draining = old
            raise

    # --- persistence -----------------------------------------------------------------------------

    def _persist(self) -> None:
        if self.path is None:
            return
        write_json_atomic(self.path, {
            "version": _STATE_VERSION,
            "node": self.node,
            "cidrs": [str(c) for c in self._active],
            "draining": [str(c) for c in self._draining],
            "cursor": str(IPv4Address(self._cursor)) if self._cursor is not None else None,
            "allocations": {str(IPv4Address(v)): o for v, o in sorted(self._owner_of.items())},
        })

    def _restore(self) -> None:
        assert self.path is not None
        doc = read_json(self.path)
        if doc is None:
            return
        try:
            self._load(doc)
        except (KeyError, TypeError, ValueError, AttributeError, IPAMError) as exc:
            raise IPAMError(f"IPAM state {self.path} is invalid: {exc}") from None

    def _load(self, doc: Any) -> None:
        if doc.get("version") != _STATE_VERSION:
            raise IPAMError(f"unsupported version {doc.get('version')!r}")
        if doc["node"] != self.node:
            raise IPAMError(f"it belongs to node {doc['node']!r}, not {self.node!r}; "
                            "each node needs its own state dir")
        active = [_as_network(str(c)) for c in doc["cidrs"]]
        draining = [_as_network(str(c)) for c in doc.get("draining") or []]
        allocations = doc["allocations"]
        if not isinstance(allocations, dict):
            raise IPAMError("'allocations' must be an object")
        for ip, owner in allocations.items():
            value = int(_as_address(ip))
            cidr = self._cidr_of(value, active + draining)
            if cidr is None:
                raise IPAMError(f"allocation {ip} is outside its CIDRs")
            first, last = _usable(cidr)
            if not first <= value <= last or not isinstance(owner, str) or not owner:
                raise IPAMError(f"allocation {ip} -> {owner!r} is not valid")
            if owner in self._ip_of:
                raise IPAMError(f"owner {owner!r} holds two addresses")
            self._take(value, owner)
        cursor = doc.get("cursor")
        self._active, self._draining = active, [c for c in draining if self._count_in(c)]
        self._cursor = int(_as_address(str(cursor))) if cursor else None
