"""The L7 part of an endpoint's policy, in the shape the HTTP proxy consumes.

The kernel map only says *that* a connection is redirected (a proxy port on the
entry). The proxy must then know *which* HTTP rules apply: every L7 entry of the
endpoint, in the redirected direction, whose peer is the connection's peer identity or
the wildcard, and whose port range holds the destination port. A request is allowed
when any of their rules allows it (Cilium: "at least one rule matches"). Entries whose
map keys all lost to a plain L4 allow (no redirect in the map state) are left out, so
the table never restricts traffic the kernel lets through unproxied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from villi.policy.entry import Direction, PolicyEntry, Protocol
from villi.policy.http import HTTPRule, Request, Verdict, evaluate
from villi.policy.mapstate import MapKey, MapValue, entry_keys

__all__ = ["Decision", "L7Entry", "decide", "l7_entries", "select"]


@dataclass(frozen=True, slots=True, order=True)
class L7Entry:
    """HTTP rules for (direction, peer identity, TCP port range) of one endpoint."""

    direction: Direction
    identity: int
    port: int
    end_port: int
    cookie: int
    rules: tuple[HTTPRule, ...]

    def covers(self, direction: int, identity: int, port: int) -> bool:
        if self.direction != direction or self.identity not in (0, identity):
            return False
        if self.port == 0:
            return True
        return self.port <= port <= (self.end_port or self.port)

    def to_wire(self) -> dict[str, object]:
        return {"direction": int(self.direction), "identity": self.identity,
                "port": self.port, "endPort": self.end_port, "cookie": self.cookie,
                "http": [r.to_wire() for r in self.rules]}

    @classmethod
    def from_wire(cls, data: Mapping[str, object]) -> L7Entry:
        rules = data.get("http") or []
        assert isinstance(rules, list)
        return cls(Direction(int(data["direction"])), int(data["identity"]),  # type: ignore[call-overload]
                   int(data.get("port", 0)), int(data.get("endPort", 0)),  # type: ignore[call-overload]
                   int(data.get("cookie", 0)),  # type: ignore[call-overload]
                   tuple(HTTPRule.from_wire(r) for r in rules))


def l7_entries(entries: Iterable[PolicyEntry],
               state: Mapping[MapKey, MapValue]) -> list[L7Entry]:
    """The endpoint's L7 entries that still redirect in its map state."""
    out = []
    entries = [e for e in entries if not e.dns]   # DNS redirects: the DNS proxy's business
    l7 = [e for e in entries if e.redirect]
    if not l7:
        return []
    for entry in entries:
        if not entry.redirect:
            # A plain allow that covers an L7 entry's traffic (e.g. a wildcard-peer L4
            # allow of the same port) allows every request of it, as in Cilium, even
            # when the datapath redirects on the narrower identity-specific entry.
            if not entry.deny and entry.protocol in (Protocol.ANY, Protocol.TCP) and any(
                    _overlaps(entry, e) for e in l7):
                out.append(L7Entry(entry.direction, int(entry.identity), entry.port,
                                   entry.end_port, entry.cookie, ()))
            continue
        redirected = any((v := state.get(k)) is not None and v.redirect
                         for k in entry_keys(entry))
        # A plain L4 allow won this key: connections that were proxied before that
        # change keep going through the proxy, which must then allow everything.
        out.append(L7Entry(entry.direction, int(entry.identity), entry.port, entry.end_port,
                           entry.cookie, entry.http if redirected else ()))
    return sorted(out)


def _overlaps(plain: PolicyEntry, l7: PolicyEntry) -> bool:
    if plain.direction != l7.direction or plain.identity not in (0, l7.identity):
        return False
    if plain.port == 0 or l7.port == 0:
        return True
    return plain.port <= (l7.end_port or l7.port) and l7.port <= (plain.end_port or plain.port)


def select(table: Sequence[L7Entry], direction: int, identity: int,
           port: int) -> list[L7Entry]:
    """The entries that apply to one redirected connection."""
    return [e for e in table if e.covers(direction, identity, port)]


@dataclass(frozen=True, slots=True)
class Decision:
    """A request's verdict plus the rule that decided it (cookie, index in its list)."""

    verdict: Verdict
    cookie: int = 0
    rule_index: int = -1


def decide(applicable: Sequence[L7Entry], request: Request) -> Decision:
    """Allowed when any rule of any applicable entry allows; denied otherwise (the cookie
    of a denial is the first applicable entry's, so flows can name a policy)."""
    for entry in applicable:
        verdict = evaluate(entry.rules, request)
        if verdict.allowed:
            return Decision(verdict, entry.cookie, verdict.rule if verdict.rule is not None
                            else -1)
    first = applicable[0].cookie if applicable else 0
    return Decision(Verdict(False), first, -1)
