"""Per-endpoint DNS caches: which IPs each pod learned for which names, until when.

Cilium keeps one cache per endpoint (a pod may only reach what *it* resolved) and treats
expiry carefully, because applications keep using an address after its TTL: an expired
IP becomes a *zombie* and stays allowed while the datapath still tracks a live
connection from the endpoint to it (``is_alive``, asked of villi's CT); only dead zombies
are released. ``min_ttl`` (``--tofqdns-min-ttl``) stretches short TTLs; ``max_ips_per_name``
(``--tofqdns-endpoint-max-ip-per-hostname``) bounds what one name can open, the oldest
IPs going to the zombies first. Caches serialise to JSON so they survive restarts
(:class:`CacheStore`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MIN_TTL = 0
DEFAULT_MAX_IPS_PER_NAME = 1000
DEFAULT_MAX_ZOMBIES = 10000


@dataclass(slots=True)
class Entry:
    """One (name, IP) pair learned from an answer."""

    name: str
    ip: str
    ttl: int          # the TTL applied (after min_ttl)
    expires: float    # wall clock
    learned: float
    source: str = "lookup"   # lookup (an answer) or restore (read back from disk)


@dataclass(slots=True)
class Zombie:
    """An expired IP still allowed while a connection to it lives."""

    ip: str
    names: set[str] = field(default_factory=set)
    since: float = 0.0


class DNSCache:
    """One endpoint's cache: name → IP → :class:`Entry`, plus its zombies."""

    def __init__(self, *, min_ttl: int = DEFAULT_MIN_TTL,
                 max_ips_per_name: int = DEFAULT_MAX_IPS_PER_NAME,
                 max_zombies: int = DEFAULT_MAX_ZOMBIES) -> None:
        if min_ttl < 0 or max_ips_per_name < 1 or max_zombies < 0:
            raise ValueError("min_ttl >= 0, max_ips_per_name >= 1, max_zombies >= 0")
        self.min_ttl = min_ttl
        self.max_ips_per_name = max_ips_per_name
        self.max_zombies = max_zombies
        self._names: dict[str, dict[str, Entry]] = {}
        self.zombies: dict[str, Zombie] = {}

    # -- learning ---------------------------------------------------------------------

    def update(self, name: str, ips: Iterable[tuple[str, int]],
               now: float | None = None, source: str = "lookup") -> list[str]:
        """Record an answer's (ip, ttl) pairs for ``name``; returns IPs that are newly
        allowed (not in this cache before, or back from the zombies)."""
        now = time.time() if now is None else now
        per_name = self._names.setdefault(name, {})
        fresh = []
        for ip, ttl in ips:
            ttl = max(int(ttl), self.min_ttl)
            old = per_name.get(ip)
            if old is None and not self._allowed_elsewhere(ip):
                fresh.append(ip)
            zombie = self.zombies.get(ip)
            if zombie is not None:
                zombie.names.discard(name)
                if not zombie.names:
                    del self.zombies[ip]
            expires = now + ttl
            if old is None or expires >= old.expires:
                per_name[ip] = Entry(name, ip, ttl, expires, now, source)
        self._enforce_limit(name, now)
        return fresh

    def _allowed_elsewhere(self, ip: str) -> bool:
        return ip in self.zombies or any(ip in m for m in self._names.values())

    def _enforce_limit(self, name: str, now: float) -> None:
        per_name = self._names[name]
        if len(per_name) <= self.max_ips_per_name:
            return
        by_age = sorted(per_name.values(), key=lambda e: (e.expires, e.ip))
        for entry in by_age[:len(per_name) - self.max_ips_per_name]:
            del per_name[entry.ip]
            self._bury(entry, now)

    def _bury(self, entry: Entry, now: float) -> None:
        zombie = self.zombies.setdefault(entry.ip, Zombie(entry.ip, set(), now))
        zombie.names.add(entry.name)

    # -- expiry -----------------------------------------------------------------------

    def expire(self, now: float | None = None) -> list[Entry]:
        """Move entries past their TTL to the zombies; returns them."""
        now = time.time() if now is None else now
        out = []
        for name in list(self._names):
            per_name = self._names[name]
            for ip in [ip for ip, e in per_name.items() if e.expires <= now]:
                entry = per_name.pop(ip)
                out.append(entry)
                if not self._still_cached(ip):
                    self._bury(entry, now)
            if not per_name:
                del self._names[name]
        return out

    def _still_cached(self, ip: str) -> bool:
        return any(ip in m for m in self._names.values())

    def collect_zombies(self, is_alive: Callable[[str], bool]) -> list[Zombie]:
        """Release zombies without a live connection (and, over ``max_zombies``, the
        oldest ones anyway); returns the released ones."""
        released = [z for z in self.zombies.values() if not is_alive(z.ip)]
        for z in released:
            del self.zombies[z.ip]
        overflow = len(self.zombies) - self.max_zombies
        if overflow > 0:
            oldest = sorted(self.zombies.values(), key=lambda z: (z.since, z.ip))[:overflow]
            for z in oldest:
                del self.zombies[z.ip]
            released += oldest
        return released

    # -- queries ----------------------------------------------------------------------

    def allowed_ips(self) -> set[str]:
        """Every IP this endpoint may currently reach through its lookups."""
        ips = {ip for m in self._names.values() for ip in m}
        return ips | set(self.zombies)

    def names_of(self, ip: str) -> list[str]:
        names = [n for n, m in self._names.items() if ip in m]
        zombie = self.zombies.get(ip)
        return sorted(set(names) | (zombie.names if zombie else set()))

    def entries(self) -> list[Entry]:
        return [e for m in self._names.values() for e in m.values()]

    def lookup(self, name: str) -> dict[str, Entry]:
        return dict(self._names.get(name, {}))

    # -- persistence ------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "entries": [{"name": e.name, "ip": e.ip, "ttl": e.ttl, "expires": e.expires,
                         "learned": e.learned} for e in self.entries()],
            "zombies": [{"ip": z.ip, "names": sorted(z.names), "since": z.since}
                        for z in self.zombies.values()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        for e in data.get("entries", []):
            per_name = self._names.setdefault(e["name"], {})
            per_name[e["ip"]] = Entry(e["name"], e["ip"], int(e["ttl"]), float(e["expires"]),
                                      float(e["learned"]), "restore")
        for z in data.get("zombies", []):
            self.zombies[z["ip"]] = Zombie(z["ip"], set(z["names"]), float(z["since"]))


class CacheStore:
    """Every endpoint's cache, keyed by the endpoint's IP, saved atomically to one file."""

    def __init__(self, path: str | Path | None = None, **cache_options: int) -> None:
        self.path = Path(path) if path else None
        self.options = cache_options
        self.caches: dict[str, DNSCache] = {}

    def for_endpoint(self, endpoint: str) -> DNSCache:
        cache = self.caches.get(endpoint)
        if cache is None:
            cache = self.caches[endpoint] = DNSCache(**self.options)
        return cache

    def names_of(self, ip: str) -> list[str]:
        """Names any endpoint resolved to ``ip`` (a flow's ``destination_names``)."""
        return sorted({n for c in self.caches.values() for n in c.names_of(ip)})

    def save(self) -> None:
        if self.path is None:
            return
        data = {"version": 1, "endpoints": {ep: c.dump() for ep, c in self.caches.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, self.path)

    def load(self) -> int:
        """Read the caches back (after a restart); returns how many endpoints."""
        if self.path is None or not self.path.exists():
            return 0
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: unreadable DNS cache file: {e}") from e
        if data.get("version") != 1:
            raise ValueError(f"{self.path}: unknown DNS cache version {data.get('version')!r}")
        for ep, dumped in data.get("endpoints", {}).items():
            self.for_endpoint(ep).restore(dumped)
        return len(data.get("endpoints", {}))

    def listing(self, now: float | None = None) -> list[dict[str, Any]]:
        """Rows like ``cilium-dbg fqdn cache list``: endpoint, name, IPs, TTL left, source."""
        now = time.time() if now is None else now
        rows = []
        for ep, cache in sorted(self.caches.items()):
            for e in sorted(cache.entries(), key=lambda e: (e.name, e.ip)):
                rows.append({"endpoint": ep, "name": e.name, "ip": e.ip, "ttl": e.ttl,
                             "ttl_left": max(0, round(e.expires - now)), "source": e.source,
                             "expires": e.expires})
            for z in sorted(cache.zombies.values(), key=lambda z: z.ip):
                for name in sorted(z.names):
                    rows.append({"endpoint": ep, "name": name, "ip": z.ip, "ttl": 0,
                                 "ttl_left": 0, "source": "zombie", "expires": z.since})
        return rows


#: is_alive(endpoint IP, destination IP): does the datapath's CT hold a live connection?
LiveCheck = Callable[[str, str], bool]


def collect(store: CacheStore, is_alive: LiveCheck,
            now: float | None = None) -> list[tuple[str, str, list[str]]]:
    """Expire every endpoint's entries and release its dead zombies; returns
    (endpoint, ip, names) of each released IP so the caller can withdraw what only that
    lookup allowed (the name manager, then the ipcache and policy maps)."""
    released = []
    for endpoint, cache in store.caches.items():
        cache.expire(now)
        for z in cache.collect_zombies(functools.partial(is_alive, endpoint)):
            released.append((endpoint, z.ip, sorted(z.names)))
    if released:
        store.save()
    return released
