"""The selector cache: for every selector in use, the identities it selects.

Rules share selectors (every rule of a namespace says ``{namespace=x}`` somewhere), so
selections are computed once per distinct selector and kept current incrementally:
when an identity appears, only selectors that could match it are tested (each label
selector is indexed under one of its ``In`` values); when one goes, it is dropped from
the selections that held it. Each update returns which selections changed so the
resolver can touch only the rules that use them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from villi.identity.ids import IdentityID
from villi.identity.labels import POD_NAMESPACE_LABEL, SOURCE_ANY, SOURCE_CIDR, LabelSet
from villi.identity.reserved import ReservedIdentity
from villi.policy.cidr import Net, net_contains_ip, net_contains_net, parse_net
from villi.policy.rules import CIDRSelector, PeerSelector
from villi.policy.selectors import IN, LabelIndex, Requirement, Selector

#: Above this many identities in one update, re-select via the index instead.
_BULK = 64

Changes = dict[PeerSelector, tuple[set[int], set[int]]]  # selector → (added, removed)


def _note(changes: Changes, sel: PeerSelector, identity: int, added: bool) -> None:
    plus, minus = changes.setdefault(sel, (set(), set()))
    if added:
        if identity in minus:
            minus.discard(identity)
        else:
            plus.add(identity)
    elif identity in plus:
        plus.discard(identity)
    else:
        minus.add(identity)


def prune(changes: Changes) -> Changes:
    return {sel: (a, r) for sel, (a, r) in changes.items() if a or r}


class SelectorCache:
    """Selections of label and CIDR selectors over the known identities."""

    def __init__(self) -> None:
        self._labels: dict[int, LabelSet] = {}
        self._index = LabelIndex()
        self._cidr: dict[int, Net] = {}
        self._ips: dict[int, set[int]] = {}
        self._selections: dict[PeerSelector, set[int]] = {}
        self._refs: dict[PeerSelector, int] = {}
        self._guarded: dict[tuple[str, str, str], set[Selector]] = {}
        self._unguarded: set[Selector] = set()
        self._cidr_selectors: set[CIDRSelector] = set()
        # CIDR selectors by each of their prefixes, so a new CIDR identity only meets
        # the selectors with a prefix containing its own; ipBlock ones separately.
        self._by_net: dict[tuple[int, int], set[CIDRSelector]] = {}
        self._pod_selectors: set[CIDRSelector] = set()

    # -- queries ------------------------------------------------------------------------

    def labels(self, identity: int) -> LabelSet | None:
        return self._labels.get(identity)

    def identities(self) -> dict[int, LabelSet]:
        return dict(self._labels)

    def selections(self, selector: PeerSelector) -> set[int]:
        """The live selection (do not mutate); empty for an unknown selector."""
        return self._selections.get(selector, set())

    def __len__(self) -> int:
        return len(self._selections)

    def in_use(self) -> list[PeerSelector]:
        """Every selector some rule references."""
        return list(self._refs)

    # -- selectors ----------------------------------------------------------------------

    def add(self, selector: PeerSelector) -> set[int]:
        """Start (or share) tracking ``selector``; returns its selection."""
        count = self._refs.get(selector, 0)
        self._refs[selector] = count + 1
        if count == 0:
            self._selections[selector] = self._evaluate(selector)
            if isinstance(selector, CIDRSelector):
                self._cidr_selectors.add(selector)
                for addr, _mask, plen in selector.nets:
                    self._by_net.setdefault((addr, plen), set()).add(selector)
                if selector.pods:
                    self._pod_selectors.add(selector)
            else:
                guard = _guard(selector)
                if guard is None:
                    self._unguarded.add(selector)
                else:
                    for value in guard.values:
                        self._guarded.setdefault((guard.source, guard.key, value), set()).add(
                            selector)
        return self._selections[selector]

    def release(self, selector: PeerSelector) -> None:
        count = self._refs.get(selector, 0)
        if count > 1:
            self._refs[selector] = count - 1
            return
        self._refs.pop(selector, None)
        self._selections.pop(selector, None)
        if isinstance(selector, CIDRSelector):
            self._cidr_selectors.discard(selector)
            self._pod_selectors.discard(selector)
            for addr, _mask, plen in selector.nets:
                nets = self._by_net.get((addr, plen))
                if nets is not None:
                    nets.discard(selector)
                    if not nets:
                        del self._by_net[(addr, plen)]
            return
        guard = _guard(selector)
        if guard is None:
            self._unguarded.discard(selector)
            return
        for value in guard.values:
            bucket = self._guarded.get((guard.source, guard.key, value))
            if bucket is not None:
                bucket.discard(selector)
                if not bucket:
                    del self._guarded[(guard.source, guard.key, value)]

    # -- identity and IP churn ----------------------------------------------------------

    def update_identities(self, added: Mapping[IdentityID, LabelSet] | Mapping[int, LabelSet],
                          removed: Iterable[int] = ()) -> Changes:
        """Apply identity churn; returns the selections that changed."""
        changes: Changes = {}
        gone = set(removed) | {i for i, lbl in added.items()
                               if i in self._labels and self._labels[i] != lbl}
        for identity in gone:
            labels = self._labels.pop(identity, None)
            if labels is None:
                continue
            self._index.remove(identity, labels)
            self._cidr.pop(identity, None)
            for selector, members in self._selections.items():
                if identity in members:
                    members.discard(identity)
                    _note(changes, selector, identity, False)
        fresh = {i: lbl for i, lbl in added.items() if i not in self._labels}
        for identity, labels in fresh.items():
            self._labels[identity] = labels
            self._index.add(identity, labels)
            for lbl in labels:
                if lbl.source == SOURCE_CIDR:
                    net = ipaddress.ip_network(lbl.key)
                    if net.version == 4:
                        self._cidr[identity] = parse_net(lbl.key)
        if len(fresh) > _BULK:
            for selector, members in self._selections.items():
                for identity in self._evaluate(selector, fresh) - members:
                    members.add(identity)
                    _note(changes, selector, identity, True)
            return prune(changes)
        for identity in fresh:
            for selector in self._candidates(identity):
                if self._match(selector, identity):
                    members = self._selections[selector]
                    if identity not in members:
                        members.add(identity)
                        _note(changes, selector, identity, True)
        return prune(changes)

    def set_ips(self, identity: int, ips: Iterable[int]) -> Changes:
        """Record the pod IPs of ``identity`` (for Kubernetes ipBlock peers)."""
        frozen = set(ips)
        if self._ips.get(identity, set()) == frozen:
            return {}
        if frozen:
            self._ips[identity] = frozen
        else:
            self._ips.pop(identity, None)
        return self._recheck_pods(identity)

    def add_ip(self, identity: int, ip: int) -> Changes:
        """One more pod IP of ``identity``: O(ipBlock selectors), not O(its pods).

        A pod selector selects an identity when every IP of it lies in the block, so
        a new IP can only drop the identity from selections (when it lies outside),
        or, being the first IP, add it to the blocks that contain it."""
        ips = self._ips.get(identity)
        if ips is not None and ip in ips:
            return {}
        if identity in self._cidr or identity == ReservedIdentity.WORLD:
            return self.set_ips(identity, [*(ips or ()), ip])
        first = not ips
        if ips is None:
            ips = self._ips[identity] = set()
        ips.add(ip)
        changes: Changes = {}
        if identity not in self._labels:
            return changes
        for selector in self._pod_selectors:
            members = self._selections[selector]
            if identity in members:
                if not net_contains_ip(selector.nets, ip):
                    members.discard(identity)
                    _note(changes, selector, identity, False)
            elif first and selector.pods and net_contains_ip(selector.nets, ip):
                members.add(identity)
                _note(changes, selector, identity, True)
        return changes

    def remove_ip(self, identity: int, ip: int) -> Changes:
        """A pod IP of ``identity`` went: the identity leaves every selection when it
        has no IP left; otherwise it can only join blocks that the IP lay outside of."""
        ips = self._ips.get(identity)
        if not ips or ip not in ips:
            return {}
        if identity in self._cidr or identity == ReservedIdentity.WORLD:
            return self.set_ips(identity, ips - {ip})
        ips.discard(ip)
        if not ips:
            del self._ips[identity]
        changes: Changes = {}
        if identity not in self._labels:
            return changes
        for selector in self._pod_selectors:
            members = self._selections[selector]
            if identity in members:
                if not ips:
                    members.discard(identity)
                    _note(changes, selector, identity, False)
            elif ips and not net_contains_ip(selector.nets, ip) \
                    and self._match(selector, identity):
                members.add(identity)
                _note(changes, selector, identity, True)
        return changes

    def _recheck_pods(self, identity: int) -> Changes:
        changes: Changes = {}
        for selector in self._pod_selectors:
            members = self._selections[selector]
            now = identity in self._labels and self._match(selector, identity)
            if now and identity not in members:
                members.add(identity)
                _note(changes, selector, identity, True)
            elif not now and identity in members:
                members.discard(identity)
                _note(changes, selector, identity, False)
        return changes

    # -- matching -----------------------------------------------------------------------

    def _candidates(self, identity: int) -> set[PeerSelector]:
        found: set[PeerSelector] = set(self._unguarded)
        for lbl in self._labels[identity]:
            for source in (lbl.source, SOURCE_ANY):
                bucket = self._guarded.get((source, lbl.key, lbl.value))
                if bucket:
                    found |= bucket
        net = self._cidr.get(identity)
        if net is not None:
            addr, _mask, plen = net
            for length in range(plen + 1):
                mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
                nets = self._by_net.get((addr & mask, length))
                if nets:
                    found |= nets
        elif identity == ReservedIdentity.WORLD:
            found |= self._by_net.get((0, 0), set())
        if identity in self._ips:
            found |= self._pod_selectors
        return found

    def _match(self, selector: PeerSelector, identity: int) -> bool:
        if isinstance(selector, Selector):
            return selector.matches(self._labels[identity])
        net = self._cidr.get(identity)
        if net is not None:
            return net_contains_net(selector.nets, net)
        if identity == ReservedIdentity.WORLD:
            return selector.everything
        ips = self._ips.get(identity)
        if selector.pods and ips:
            return all(net_contains_ip(selector.nets, ip) for ip in ips)
        return False

    def _evaluate(self, selector: PeerSelector,
                  among: Mapping[int, LabelSet] | None = None) -> set[int]:
        if isinstance(selector, Selector):
            hit = self._index.select(selector)
            return hit if among is None else hit & among.keys()
        pool: Iterable[int] = among.keys() if among is not None else self._labels.keys()
        return {i for i in pool if self._match(selector, i)}


def _guard(selector: Selector) -> Requirement | None:
    """The ``In`` requirement a selector is indexed under (None: test on every add)."""
    best: tuple[tuple[bool, int], Requirement] | None = None
    for req in selector.requirements:
        if req.operator != IN:
            continue
        rank = (req.key == POD_NAMESPACE_LABEL, len(req.values))
        if best is None or rank < best[0]:
            best = (rank, req)
    return best[1] if best is not None else None
