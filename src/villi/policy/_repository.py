"""The policy repository core: compiled rules on subjects, kept current incrementally.

Three kinds of change reach a rule section's entries, each handled at its own cost:

* a rule attached to or detached from a subject: the section's entries (computed once
  per section and shared by every subject) are added to or removed from the subject;
* a selection change (an identity came or went, a pod IP moved in or out of an
  ipBlock): only the entries *of those identities* are computed and added, or the
  entries of identities no peer selects any more are dropped — Cilium's
  ``IdentitySelectionUpdated`` path — so a new CIDR identity costs a few entries per
  ``world`` rule, not a recomputation of every ``world`` rule;
* anything else that changes a section's output (a peer's named ports): the section is
  recomputed once, at the next flush, and the difference is computed once per distinct
  old contribution and shared by all subjects holding it.

Propagation is deferred to :meth:`Repository._propagate`, run at flush, so a batch of
changes touches each section once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from villi.policy._subject import EMPTY, PortsSig, Subject, SubjectKey, section_entries
from villi.policy.entry import Direction, PolicyEntry
from villi.policy.rules import CompiledRule, CookieTable, PeerSelector, RuleKey, Section
from villi.policy.selectorcache import Changes, SelectorCache

_Delta = tuple[frozenset[PolicyEntry], frozenset[PolicyEntry], frozenset[PolicyEntry]]


class Repository:
    """Rules, sections, selector users and subjects; the resolver builds on this."""

    def __init__(self) -> None:
        self.cookies = CookieTable()
        self.selectors = SelectorCache()
        self._rules: dict[RuleKey, CompiledRule] = {}
        self._rules_by_ns: dict[str | None, set[RuleKey]] = {}
        self._rule_subjects: dict[RuleKey, set[SubjectKey]] = {}
        self._sections: dict[int, tuple[RuleKey, Section]] = {}
        self._section_cache: dict[int, dict[PortsSig | None, frozenset[PolicyEntry]]] = {}
        self._users: dict[PeerSelector, dict[int, int]] = {}  # selector → cookie → refs
        self._egress_named: set[int] = set()
        self._subjects: dict[SubjectKey, Subject] = {}
        self._subjects_by_ns: dict[str | None, set[SubjectKey]] = {}
        self._identity_ports: dict[int, dict[str, set[tuple[int, int]]]] = {}
        self._dirty: set[SubjectKey] = set()
        self._stale: set[int] = set()
        self._id_delta: dict[int, tuple[set[int], set[int]]] = {}

    # -- selectors ----------------------------------------------------------------------

    def _register_selectors(self, rule: CompiledRule) -> None:
        for section in rule.sections:
            for peer in section.peers:
                self.selectors.add(peer)
                users = self._users.setdefault(peer, {})
                users[section.cookie] = users.get(section.cookie, 0) + 1

    def _unregister_selectors(self, rule: CompiledRule) -> None:
        for section in rule.sections:
            for peer in section.peers:
                self.selectors.release(peer)
                users = self._users[peer]
                if users[section.cookie] > 1:
                    users[section.cookie] -= 1
                    continue
                del users[section.cookie]
                if not users:
                    del self._users[peer]

    def _apply_changes(self, changes: Changes) -> None:
        """Queue per-identity deltas for every section using a changed selector."""
        for selector, (plus, minus) in changes.items():
            for cookie in self._users.get(selector, ()):
                if cookie in self._stale:
                    continue
                added, removed = self._id_delta.setdefault(cookie, (set(), set()))
                added |= plus
                removed |= minus

    def _recompute(self, cookies: Iterable[int]) -> None:
        """Queue full recomputations (at the next flush)."""
        for cookie in cookies:
            if cookie in self._sections:
                self._stale.add(cookie)
                self._id_delta.pop(cookie, None)
                self._section_cache.pop(cookie, None)

    # -- rules on subjects --------------------------------------------------------------

    def _attach_rule(self, rule: CompiledRule) -> None:
        self._rules[rule.key] = rule
        self._rules_by_ns.setdefault(rule.namespace, set()).add(rule.key)
        for section in rule.sections:
            self._forget_section(section.cookie)
            self._sections[section.cookie] = (rule.key, section)
            if section.direction is Direction.EGRESS and section.named_ports:
                self._egress_named.add(section.cookie)
        pool = (self._subjects_by_ns.get(rule.namespace, set()) if rule.namespace is not None
                else self._subjects.keys())
        matched = {k for k in pool if rule.subject.matches(self._subjects[k].labels)}
        self._rule_subjects[rule.key] = matched
        for key in matched:
            self._attach(self._subjects[key], rule)

    def _detach_rule(self, rule: CompiledRule) -> None:
        for key in self._rule_subjects.pop(rule.key, set()):
            subject = self._subjects[key]
            subject.rules.discard(rule.key)
            for direction in (0, 1):
                subject.enforcers[direction].discard(rule.key)
            for section in rule.sections:
                subject.set_contribution(section.cookie, EMPTY)
            self._dirty.add(key)
        self._rules.pop(rule.key, None)
        bucket = self._rules_by_ns.get(rule.namespace)
        if bucket is not None:
            bucket.discard(rule.key)
        for section in rule.sections:
            self._sections.pop(section.cookie, None)
            self._forget_section(section.cookie)

    def _forget_section(self, cookie: int) -> None:
        self._section_cache.pop(cookie, None)
        self._egress_named.discard(cookie)
        self._stale.discard(cookie)
        self._id_delta.pop(cookie, None)

    def _attach(self, subject: Subject, rule: CompiledRule) -> None:
        subject.rules.add(rule.key)
        for direction in (0, 1):
            if rule.enforce[direction]:
                subject.enforcers[direction].add(rule.key)
        for section in rule.sections:
            subject.set_contribution(section.cookie, self._contribution(section, subject))
        self._dirty.add(subject.key)

    def _new_subject(self, key: SubjectKey) -> Subject:
        subject = Subject(key)
        self._subjects[key] = subject
        self._subjects_by_ns.setdefault(subject.namespace, set()).add(key)
        candidates = set(self._rules_by_ns.get(None, set()))
        if subject.namespace is not None:
            candidates |= self._rules_by_ns.get(subject.namespace, set())
        for rule_key in candidates:
            rule = self._rules[rule_key]
            if rule.subject.matches(subject.labels):
                self._rule_subjects[rule_key].add(key)
                self._attach(subject, rule)
        self._dirty.add(key)
        return subject

    def _drop_subject(self, key: SubjectKey) -> None:
        subject = self._subjects.pop(key)
        self._subjects_by_ns.get(subject.namespace, set()).discard(key)
        for rule_key in subject.rules:
            self._rule_subjects.get(rule_key, set()).discard(key)
        self._dirty.discard(key)

    # -- entries ------------------------------------------------------------------------

    @staticmethod
    def _sig(section: Section, subject: Subject) -> PortsSig | None:
        """Only ingress named ports make a section's entries depend on the subject."""
        return subject.key[1] if section.per_subject else None

    def _contribution(self, section: Section, subject: Subject) -> frozenset[PolicyEntry]:
        sig = self._sig(section, subject)
        cache = self._section_cache.setdefault(section.cookie, {})
        found = cache.get(sig)
        if found is None:
            ids = {0} if section.wildcard else self._selected(section)
            found = cache[sig] = self._compute(section, subject.ports, ids)
        return found

    def _selected(self, section: Section) -> set[int]:
        ids: set[int] = set()
        for peer in section.peers:
            ids |= self.selectors.selections(peer)
        return ids

    def _compute(self, section: Section, own_ports: Mapping[str, tuple[int, int]],
                 ids: set[int]) -> frozenset[PolicyEntry]:
        return section_entries(section, ids, own_ports, self._identity_ports)

    def _propagate(self) -> None:
        """Apply queued recomputations and identity deltas to the subjects."""
        stale, self._stale = self._stale, set()
        for cookie in stale:
            self._propagate_full(cookie)
        deltas, self._id_delta = self._id_delta, {}
        for cookie, (added, removed) in deltas.items():
            self._propagate_ids(cookie, added, removed)

    def _propagate_full(self, cookie: int) -> None:
        found = self._sections.get(cookie)
        if found is None:
            return
        rule_key, section = found
        memo: dict[tuple[int, int], tuple[frozenset[PolicyEntry], frozenset[PolicyEntry]]] = {}
        for key in self._rule_subjects.get(rule_key, ()):
            subject = self._subjects[key]
            new = self._contribution(section, subject)
            old = subject.contrib.get(cookie, EMPTY)
            if old is new:
                continue
            delta = memo.get((id(old), id(new)))
            if delta is None:
                delta = memo[(id(old), id(new))] = (new - old, old - new)
            subject.apply_delta(cookie, new, *delta)
            self._dirty.add(key)

    def _propagate_ids(self, cookie: int, added: set[int], removed: set[int]) -> None:
        found = self._sections.get(cookie)
        if found is None:
            return
        rule_key, section = found
        if not self._rule_subjects.get(rule_key):
            # No local subject: recompute lazily if one ever attaches.
            self._section_cache.pop(cookie, None)
            return
        selections = [self.selectors.selections(p) for p in section.peers]
        gone = {i for i in removed if not any(i in s for s in selections)}
        fresh = {i for i in added if any(i in s for s in selections)}
        if not gone and not fresh:
            return
        cache = self._section_cache.get(cookie, {})
        deltas: dict[tuple[PortsSig | None, int], _Delta] = {}
        new_cache: dict[PortsSig | None, frozenset[PolicyEntry]] = {}
        for sig, old in cache.items():
            own = {n: (p, pr) for n, p, pr in sig} if sig else {}
            plus = self._compute(section, own, fresh) - old if fresh else EMPTY
            if not gone:
                minus = EMPTY
            elif section.named_ports:  # the peers' ports may be gone already: scan
                minus = frozenset(e for e in old if e.identity in gone)
            else:
                minus = self._compute(section, own, gone) & old
            if plus and minus:
                new = (old - minus) | plus
            elif plus:
                new = old | plus
            elif minus:
                new = old - minus
            else:
                new = old
            new = new if new else EMPTY
            new_cache[sig] = new
            deltas[(sig, id(old))] = (new, plus, minus)
        self._section_cache[cookie] = new_cache
        shared = None if section.per_subject else cache.get(None)
        subjects, dirty = self._subjects, self._dirty
        for key in self._rule_subjects.get(rule_key, ()):
            subject = subjects[key]
            current = subject.contrib.get(cookie, EMPTY)
            if shared is not None:
                delta = deltas[(None, id(shared))] if current is shared else None
            else:
                delta = deltas.get((self._sig(section, subject), id(current)))
            if delta is not None:
                changed = subject.apply_delta(cookie, *delta)
            else:  # not holding the shared object (should not happen): diff the slow way
                changed = subject.set_contribution(cookie, self._contribution(section, subject))
            if changed:
                dirty.add(key)
