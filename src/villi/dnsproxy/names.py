"""The name manager: from learned (name, IP) pairs to the labels of the IPs' identities.

Cilium's NameManager sits between the DNS caches and the toFQDNs selectors. Here it
keeps, for every IP some endpoint learned, the names that resolved to it, and so the
``fqdn:<pattern>`` labels its local CIDR identity must carry (one per toFQDNs pattern a
name matches, see ``villi.policy.fqdn``). It hands only *changes* to the ``apply``
hook — the agent's side, which allocates the ``1 << 24``-range identity, writes the
ipcache and feeds the selector cache so that policy maps change by diff. IPs whose
names match no selector get nothing: they stay ``world``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from villi.identity.labels import LabelSet
from villi.policy.fqdn import check_pattern, fqdn_identity_labels, matches

#: apply(changed: {ip: labels}, removed: [ip]) — must finish before answers are released.
ApplyHook = Callable[[dict[str, LabelSet], list[str]], Awaitable[None]]


class NameManager:
    def __init__(self, apply: ApplyHook, patterns: Iterable[str] = ()) -> None:
        self._apply = apply
        self._patterns: frozenset[str] = frozenset(check_pattern(p) for p in patterns)
        self._names: dict[str, set[str]] = {}          # ip → names
        self._labelled: dict[str, frozenset[str]] = {}  # ip → patterns applied

    @property
    def patterns(self) -> frozenset[str]:
        return self._patterns

    def _wanted(self, ip: str) -> frozenset[str]:
        names = self._names.get(ip, ())
        return frozenset(p for p in self._patterns if any(matches(p, n) for n in names))

    def _diff(self, ips: Iterable[str]) -> tuple[dict[str, LabelSet], list[str]]:
        changed: dict[str, LabelSet] = {}
        removed: list[str] = []
        for ip in ips:
            want = self._wanted(ip)
            have = self._labelled.get(ip, frozenset())
            if want == have:
                continue
            if want:
                self._labelled[ip] = want
                changed[ip] = fqdn_identity_labels(ip, want)
            else:
                self._labelled.pop(ip, None)
                removed.append(ip)
        return changed, removed

    async def learned(self, name: str, ips: Iterable[str]) -> int:
        """Record that ``name`` resolved to ``ips``; applies label changes (awaited by
        the proxy before it releases the answer). Returns how many IPs changed."""
        ips = list(ips)
        for ip in ips:
            self._names.setdefault(ip, set()).add(name)
        changed, removed = self._diff(ips)
        if changed or removed:
            await self._apply(changed, removed)
        return len(changed) + len(removed)

    async def forget(self, ip: str, name: str | None = None) -> None:
        """No endpoint holds ``ip`` (for ``name``, or at all) any more."""
        names = self._names.get(ip)
        if names is None:
            return
        if name is None:
            names.clear()
        else:
            names.discard(name)
        if not names:
            del self._names[ip]
        changed, removed = self._diff([ip])
        if changed or removed:
            await self._apply(changed, removed)

    async def set_patterns(self, patterns: Iterable[str]) -> None:
        """The toFQDNs patterns in force changed (a policy was applied or deleted)."""
        self._patterns = frozenset(check_pattern(p) for p in patterns)
        changed, removed = self._diff(list(self._names) + list(self._labelled))
        if changed or removed:
            await self._apply(changed, removed)

    def labelled(self) -> dict[str, frozenset[str]]:
        return dict(self._labelled)
