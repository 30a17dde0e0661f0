"""The policy repository and resolver: resources + identities + endpoints → entries.

Everything is incremental. A change — a policy applied or deleted, an identity or pod
appearing, an endpoint added or relabelled — touches only the rule sections and
subjects it affects and returns a :class:`PolicyUpdate` with, per affected endpoint, the
entries added and removed and the kernel map diff. Nothing is rebuilt: a policy update
on a node with a thousand endpoints costs work proportional to what the policy selects.

Flow of a policy upsert: compile the resource (``rules.py``), give its CIDR prefixes
local identities (which may widen existing selections, e.g. ``world``), register its
selectors in the selector cache, swap the resource's old rules for the new ones on the
subjects they select (unchanged sections keep their cookie and cancel out), release what
the old version used, then flush: per dirty subject, the entry diff goes through the
per-subject map state and becomes a map diff for each of its endpoints.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from villi.identity.ids import IdentityID
from villi.identity.labels import SOURCE_FQDN, LabelSet, cidr_labels, namespace_labels
from villi.identity.local import LocalIdentityAllocator
from villi.identity.reserved import ReservedIdentity, reserved_identities
from villi.policy._repository import Repository
from villi.policy._subject import (
    EMPTY,
    Batch,
    Endpoint,
    EndpointPolicy,
    EndpointPolicyDiff,
    PodRecord,
    PolicyUpdate,
    PortsSig,
    Snapshot,
    SubjectKey,
    ports_signature,
)
from villi.policy.cidr import ip_to_int
from villi.policy.entry import Direction, EndpointID, PolicyEntry
from villi.policy.l7table import L7Entry, l7_entries
from villi.policy.mapstate import diff_map_state
from villi.policy.models import Namespace, Resource, resource_key
from villi.policy.rules import (
    LOCALHOST_COOKIE,
    CompiledRule,
    CookieInfo,
    RuleKey,
    compile_policy,
)

__all__ = ["Endpoint", "EndpointPolicy", "EndpointPolicyDiff", "MapWriter", "PolicyResolver",
           "PolicyUpdate"]

#: Called once per endpoint diff after every change (the kernel map writer plugs in here).
MapWriter = Callable[[EndpointPolicyDiff], None]
ResourceKey = tuple[str, str | None, str]

_HOST_ALLOW = frozenset({PolicyEntry(IdentityID(int(ReservedIdentity.HOST)), Direction.INGRESS,
                                     cookie=LOCALHOST_COOKIE)})


class PolicyResolver(Repository):
    """Policy repository + selector cache + per-endpoint resolution, all incremental.

    Every mutating method returns the :class:`PolicyUpdate` it caused (empty inside a
    :meth:`batch`, whose update is delivered when the block exits) and hands each
    endpoint diff to ``map_writer``.
    """

    def __init__(self, *, map_writer: MapWriter | None = None, allow_localhost: bool = True,
                 local_identities: LocalIdentityAllocator | None = None) -> None:
        super().__init__()
        self.map_writer = map_writer
        self.allow_localhost = allow_localhost
        self.local = local_identities or LocalIdentityAllocator()
        self._resources: dict[ResourceKey, Resource] = {}
        self._namespaces: dict[str, dict[str, str]] = {}
        self._resource_rules: dict[ResourceKey, list[RuleKey]] = {}
        self._resource_prefixes: dict[ResourceKey, frozenset[str]] = {}
        self._endpoints: dict[EndpointID, tuple[Endpoint, SubjectKey]] = {}
        self._pods: dict[str, PodRecord] = {}
        # Per identity, how many pods hold each IP and each named port: a pod change
        # costs O(its IPs and ports), not O(the identity's pods) (issue 16: 350,000 pods
        # of 3,000 identities made every upsert rebuild a 117-pod set).
        self._identity_ips: dict[int, Counter[int]] = {}
        self._identity_port_counts: dict[int, Counter[tuple[str, int, int]]] = {}
        self._ports_intern: dict[PortsSig, PortsSig] = {}
        self._moved: dict[EndpointID, Snapshot] = {}
        self._cidr_up: dict[str, IdentityID] = {}
        self._cidr_down: dict[str, IdentityID] = {}
        self._batch: Batch | None = None
        self._fqdn: dict[str, LabelSet] = {}   # learned ip/32 → labels with fqdn:<pattern>
        self._apply_changes(self.selectors.update_identities(reserved_identities()))

    # -- queries ------------------------------------------------------------------------

    def policy(self, endpoint: int) -> EndpointPolicy:
        """The current resolved policy of a local endpoint."""
        _ep, key = self._endpoints[EndpointID(endpoint)]
        subject = self._subjects[key]
        ingress, egress = subject.enforced
        return EndpointPolicy(ingress, egress, subject.entries())

    def enforcing_rules(self, endpoint: int) -> tuple[list[RuleKey], list[RuleKey]]:
        """(ingress, egress): the rules that make the endpoint default-deny in each
        direction (``villi policy trace`` names them when nothing allows a packet)."""
        subject = self._subjects[self._endpoints[EndpointID(endpoint)][1]]
        return sorted(subject.enforcers[0], key=str), sorted(subject.enforcers[1], key=str)

    def selector_users(self) -> dict[str, list[int]]:
        """Every selector in use (as text) → the cookies of the rule sections using it
        (``villi policy selectors``)."""
        return {str(sel): sorted(users) for sel, users in self._users.items()}

    def map_state(self, endpoint: int) -> dict:
        """The endpoint's current kernel map rows (MapKey → MapValue)."""
        return dict(self._subjects[self._endpoints[EndpointID(endpoint)][1]].mapstate.state)

    def l7_table(self, endpoint: int) -> list[L7Entry]:
        """The endpoint's HTTP rules for the proxy (entries that redirect)."""
        subject = self._subjects[self._endpoints[EndpointID(endpoint)][1]]
        return l7_entries(subject.entries(), subject.mapstate.state)

    def cookie_info(self, cookie: int) -> CookieInfo | None:
        """Which policy rule a cookie names (for flow explanations)."""
        return self.cookies.info(cookie)

    def cidr_identities(self) -> dict[str, IdentityID]:
        """Prefixes the ipcache must map to local CIDR identities (policy-derived)."""
        return self.local.live()

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """A namespace's labels from applied Namespace resources (+ the implicit name)."""
        return namespace_labels(namespace, self._namespaces.get(namespace))

    def resources(self) -> list[Resource]:
        return list(self._resources.values())

    def endpoints(self) -> list[Endpoint]:
        return [ep for ep, _key in self._endpoints.values()]

    # -- batching -----------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """Group changes into one flush (e.g. applying many files at agent start)."""
        if self._batch is not None:
            yield self._batch
            return
        self._batch = batch = Batch()
        try:
            yield batch
        finally:
            self._batch = None
            batch.update = self._flush()

    def _done(self) -> PolicyUpdate:
        return PolicyUpdate() if self._batch is not None else self._flush()

    # -- resources ----------------------------------------------------------------------

    def apply(self, resources: Iterable[Resource]) -> PolicyUpdate:
        """Upsert many resources with one flush."""
        with self.batch() as batch:
            for resource in resources:
                self.upsert_resource(resource)
        return batch.update

    def upsert_resource(self, resource: Resource) -> PolicyUpdate:
        key = resource_key(resource)
        self._resources[key] = resource
        if isinstance(resource, Namespace):
            # Namespace labels reach policy through pod identity labels, which the
            # agent recomputes; here they are only recorded.
            self._namespaces[resource.metadata.name] = dict(resource.metadata.labels or {})
            return self._done()
        self._replace_rules(key, compile_policy(resource, self.cookies))
        return self._done()

    def delete_resource(self, kind: str, namespace: str | None, name: str) -> PolicyUpdate:
        key = (kind, namespace, name)
        resource = self._resources.pop(key, None)
        if isinstance(resource, Namespace):
            self._namespaces.pop(name, None)
        elif resource is not None:
            self._replace_rules(key, [])
        return self._done()

    def _replace_rules(self, key: ResourceKey, new_rules: list[CompiledRule]) -> None:
        old_keys = self._resource_rules.get(key, [])
        old_rules = [self._rules[k] for k in old_keys]
        if old_rules == new_rules:
            return
        old_prefixes = self._resource_prefixes.get(key, frozenset())
        new_prefixes = frozenset().union(*(r.prefixes for r in new_rules))
        self._acquire_prefixes(new_prefixes - old_prefixes)
        for rule in new_rules:
            self._register_selectors(rule)
        for rule in old_rules:
            self._detach_rule(rule)
        for rule in new_rules:
            self._attach_rule(rule)
        for rule in old_rules:
            self._unregister_selectors(rule)
        self._release_prefixes(old_prefixes - new_prefixes)
        if new_rules:
            self._resource_rules[key] = [r.key for r in new_rules]
            self._resource_prefixes[key] = new_prefixes
        else:
            self._resource_rules.pop(key, None)
            self._resource_prefixes.pop(key, None)

    def _acquire_prefixes(self, prefixes: Iterable[str]) -> None:
        added: dict[int, LabelSet] = {}
        for prefix in prefixes:
            identity, fresh = self.local.acquire(prefix)
            if fresh:
                added[identity] = cidr_labels(prefix)
                self._cidr_up[prefix] = identity
                self._cidr_down.pop(prefix, None)
        if added:
            self._apply_changes(self.selectors.update_identities(added))

    def _release_prefixes(self, prefixes: Iterable[str]) -> None:
        removed = []
        for prefix in prefixes:
            identity, gone = self.local.release(prefix)
            if gone:
                removed.append(identity)
                if self._cidr_up.pop(prefix, None) is None:
                    self._cidr_down[prefix] = identity
        if removed:
            self._apply_changes(self.selectors.update_identities({}, removed))

    # -- FQDN: IPs learned by the DNS proxy ----------------------------------------------

    def fqdn_patterns(self) -> list[str]:
        """The toFQDNs patterns in force (what the DNS proxy's name manager labels by)."""
        out = set()
        for sel in self.selectors.in_use():
            reqs: tuple[Any, ...] = getattr(sel, "requirements", ())
            if len(reqs) == 1 and reqs[0].source == SOURCE_FQDN:
                out.add(reqs[0].key)
        return sorted(out)

    def learn_fqdn(self, changed: Mapping[str, LabelSet],
                   removed: Iterable[str] = ()) -> PolicyUpdate:
        """IPs the DNS proxy learned for names that toFQDNs selectors match.

        Each IP gets the local CIDR identity of ``ip/32`` (shared with a toCIDR rule
        naming the same prefix) carrying ``changed[ip]`` as labels (``cidr:``,
        ``reserved:world`` and ``fqdn:<pattern>`` ones). The selector cache then selects
        it for the matching toFQDNs selectors, and the update holds the map diff of just
        those rules plus the ipcache prefix to write. ``removed`` IPs lose their fqdn
        labels (and the identity, unless a CIDR rule still holds the prefix)."""
        added: dict[int, LabelSet] = {}
        gone: list[int] = []
        for ip, labels in changed.items():
            prefix = f"{ip}/32"
            if prefix not in self._fqdn:
                identity, fresh = self.local.acquire(prefix)
                if fresh:
                    self._cidr_up[prefix] = identity
                    self._cidr_down.pop(prefix, None)
            else:
                identity = self.local.lookup(prefix)  # type: ignore[assignment]
            self._fqdn[prefix] = labels
            added[int(identity)] = labels
        for ip in removed:
            prefix = f"{ip}/32"
            if self._fqdn.pop(prefix, None) is None:
                continue
            identity, last = self.local.release(prefix)
            if last:
                gone.append(int(identity))
                if self._cidr_up.pop(prefix, None) is None:
                    self._cidr_down[prefix] = identity
            else:
                added[int(identity)] = cidr_labels(prefix)   # a CIDR rule still holds it
        self._apply_changes(self.selectors.update_identities(added, gone))
        return self._done()

    # -- identities and pods ------------------------------------------------------------

    def update_identities(self, added: Mapping[IdentityID, LabelSet],
                          removed: Iterable[IdentityID] = ()) -> PolicyUpdate:
        """Identity churn (wire this to ``IdentityCache.add_listener``)."""
        removed = [i for i in removed if i not in added]
        self._apply_changes(self.selectors.update_identities(added, removed))
        return self._done()

    def identity_listener(self, added: Mapping[IdentityID, LabelSet],
                          removed: Mapping[IdentityID, LabelSet]) -> None:
        """An ``IdentityCache`` listener; diffs go to ``map_writer``."""
        self.update_identities(added, removed.keys())

    def upsert_pod(self, key: str, identity: int, ips: Iterable[str] = (),
                   named_ports: Mapping[str, tuple[int, int]] | None = None) -> PolicyUpdate:
        """A pod anywhere in the cluster: its IPs (for ipBlock) and named ports (egress)."""
        ports = ports_signature(named_ports or {})
        # Replicas share their ports: one tuple for all (memory at 350,000 pods).
        ports = self._ports_intern.setdefault(ports, ports)
        if len(self._ports_intern) > 100_000:
            self._ports_intern.clear()
        self._set_pod(key, PodRecord(identity, tuple(ip_to_int(ip) for ip in ips), ports))
        return self._done()

    def delete_pod(self, key: str) -> PolicyUpdate:
        self._set_pod(key, None)
        return self._done()

    def _set_pod(self, key: str, pod: PodRecord | None) -> None:
        old = self._pods.pop(key, None)
        if pod is not None:
            self._pods[key] = pod
        if old == pod:
            return
        # Count the new record in before the old one out: what both hold never drops
        # to zero, so it causes no selection change.
        if pod is not None:
            self._pod_counts(pod, +1)
        if old is not None:
            self._pod_counts(old, -1)

    def _pod_counts(self, pod: PodRecord, delta: int) -> None:
        identity = pod.identity
        counts = self._identity_ips.setdefault(identity, Counter())
        for ip in pod.ips:
            n = counts[ip] + delta
            if n > 0:
                counts[ip] = n
                if n == 1 and delta > 0:
                    self._apply_changes(self.selectors.add_ip(identity, ip))
            else:
                del counts[ip]
                self._apply_changes(self.selectors.remove_ip(identity, ip))
        if not counts:
            del self._identity_ips[identity]
        if not pod.ports:
            return
        pcounts = self._identity_port_counts.setdefault(identity, Counter())
        changed = False
        for port in pod.ports:
            n = pcounts[port] + delta
            if n > 0:
                pcounts[port] = n
                changed |= n == 1 and delta > 0
            else:
                del pcounts[port]
                changed = True
        if not pcounts:
            del self._identity_port_counts[identity]
        if changed:
            self._refresh_ports(identity)

    def _refresh_ports(self, identity: int) -> None:
        ports: dict[str, set[tuple[int, int]]] = {}
        for name, port, proto in self._identity_port_counts.get(identity, ()):
            ports.setdefault(name, set()).add((port, proto))
        if ports == self._identity_ports.get(identity, {}):
            return
        if ports:
            self._identity_ports[identity] = ports
        else:
            self._identity_ports.pop(identity, None)
        stale = []
        for cookie in self._egress_named:
            section = self._sections[cookie][1]
            if section.wildcard or any(identity in self.selectors.selections(p)
                                       for p in section.peers):
                stale.append(cookie)
        self._recompute(stale)

    # -- endpoints ----------------------------------------------------------------------

    def upsert_endpoint(self, endpoint: Endpoint) -> PolicyUpdate:
        """Add or update a local endpoint (a label change moves it to another subject)."""
        ports = {n: (int(p), int(pr)) for n, (p, pr) in endpoint.named_ports.items()}
        self._set_pod(f"endpoint:{endpoint.id}", PodRecord(
            endpoint.identity, (ip_to_int(endpoint.ipv4),) if endpoint.ipv4 else (),
            ports_signature(ports)))
        key: SubjectKey = (endpoint.labels, ports_signature(ports))
        old = self._endpoints.get(endpoint.id)
        self._endpoints[endpoint.id] = (endpoint, key)
        if old is not None and old[1] == key:
            return self._done()
        if endpoint.id not in self._moved:
            self._moved[endpoint.id] = self._snapshot(old[1] if old else None)
        if old is not None:
            self._leave(endpoint.id, old[1])
        subject = self._subjects.get(key) or self._new_subject(key)
        subject.endpoints.add(endpoint.id)
        return self._done()

    def delete_endpoint(self, endpoint: int) -> PolicyUpdate:
        eid = EndpointID(endpoint)
        old = self._endpoints.pop(eid, None)
        if old is None:
            return self._done()
        self._set_pod(f"endpoint:{eid}", None)
        if eid not in self._moved:
            self._moved[eid] = self._snapshot(old[1])
        self._moved[eid].deleted = True
        self._leave(eid, old[1])
        return self._done()

    def _snapshot(self, key: SubjectKey | None) -> Snapshot:
        if key is None:
            return Snapshot(EMPTY, {}, (False, False))
        subject = self._subjects[key]
        return Snapshot(subject.mapstate.entries(), dict(subject.mapstate.state),
                        subject.flushed)

    def _leave(self, eid: EndpointID, key: SubjectKey) -> None:
        subject = self._subjects[key]
        subject.endpoints.discard(eid)
        if not subject.endpoints:
            self._drop_subject(key)

    # -- flush --------------------------------------------------------------------------

    def _flush(self) -> PolicyUpdate:
        self._propagate()
        diffs: dict[EndpointID, EndpointPolicyDiff] = {}
        for key in self._dirty:
            subject = self._subjects.get(key)
            if subject is None:
                continue
            ingress, egress = subject.enforced
            host = _HOST_ALLOW if self.allow_localhost and ingress else EMPTY
            subject.set_contribution(LOCALHOST_COOKIE, host)
            plus, minus = subject.take_pending()
            upserts, deletes = subject.mapstate.apply(plus, minus)
            changed = subject.flushed != (ingress, egress)
            subject.flushed = (ingress, egress)
            if not (plus or minus or changed):
                continue
            for eid in subject.endpoints:
                if eid not in self._moved:
                    diffs[eid] = EndpointPolicyDiff(eid, plus, minus, ingress, egress, changed,
                                                    upserts, frozenset(deletes))
        for eid, snap in self._moved.items():
            diffs[eid] = self._moved_diff(eid, snap)
        update = PolicyUpdate(diffs, dict(self._cidr_up), dict(self._cidr_down))
        self._dirty.clear()
        self._moved.clear()
        self._cidr_up.clear()
        self._cidr_down.clear()
        if self.map_writer is not None:
            for diff in diffs.values():
                self.map_writer(diff)
        return update

    def _moved_diff(self, eid: EndpointID, snap: Snapshot) -> EndpointPolicyDiff:
        current = self._endpoints.get(eid)
        if snap.deleted or current is None:
            return EndpointPolicyDiff(eid, EMPTY, snap.entries, False, False,
                                      snap.enforced != (False, False), {},
                                      frozenset(snap.state), deleted=True)
        subject = self._subjects[current[1]]
        entries = subject.entries()
        upserts, deletes = diff_map_state(snap.state, subject.mapstate.state)
        return EndpointPolicyDiff(eid, entries - snap.entries, snap.entries - entries,
                                  *subject.flushed, snap.enforced != subject.flushed,
                                  upserts, frozenset(deletes))
