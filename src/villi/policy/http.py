"""HTTP (L7) rules as value objects, and the per-request verdict Cilium's proxy gives.

A ``toPorts[].rules.http`` list compiles to a tuple of :class:`HTTPRule`. The resolver
only needs them to be hashable (they ride on policy entries); the proxy evaluates them
per request with :func:`evaluate`. Semantics follow Cilium's ``layer7.rst``:

* ``method``, ``path`` and ``host`` are regular expressions anchored at both ends (Cilium
  says extended POSIX; Python's ``re`` agrees on every construct ERE has). ``path`` is
  matched against the request target as sent (path and query), like Envoy's ``:path``.
* ``headers``: each ``Name`` (or ``Name: value``) must be present (with that value).
* ``headerMatches``: ``name`` must have ``value``; on a mismatch the ``mismatch`` action
  decides: empty = deny, ``LOG`` = allow and report, ``ADD`` = allow and add the value,
  ``DELETE`` = allow and remove the mismatching header, ``REPLACE`` = allow and set the
  value.
* A request is allowed when at least one rule allows it; header edits come from the
  first allowing rule.

Pure logic: no I/O, importable by the agent, the policy engine and the proxy alike.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["HTTPRule", "HeaderMatch", "Request", "Verdict", "evaluate", "MISMATCH_ACTIONS"]

MISMATCH_ACTIONS = ("", "LOG", "ADD", "DELETE", "REPLACE")


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


@dataclass(frozen=True, slots=True, order=True)
class HeaderMatch:
    """One ``headerMatches`` element."""

    name: str
    value: str = ""
    mismatch: str = ""


@dataclass(frozen=True, slots=True, order=True)
class HTTPRule:
    """One ``rules.http`` element. Empty strings match anything."""

    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("method", self.method), ("path", self.path),
                                          ("host", self.host)) if v]
        parts += [f"header={h}" for h in self.headers]
        parts += [f"headerMatch={m.name}:{m.value}" for m in self.header_matches]
        return "{" + " ".join(parts) + "}" if parts else "{any}"

    def to_wire(self) -> dict[str, object]:
        """JSON form sent to the proxy (field names as users write them)."""
        out: dict[str, object] = {}
        if self.method:
            out["method"] = self.method
        if self.path:
            out["path"] = self.path
        if self.host:
            out["host"] = self.host
        if self.headers:
            out["headers"] = list(self.headers)
        if self.header_matches:
            out["headerMatches"] = [{"name": m.name, "value": m.value, "mismatch": m.mismatch}
                                    for m in self.header_matches]
        return out

    @classmethod
    def from_wire(cls, data: dict[str, object]) -> HTTPRule:
        raw_matches = data.get("headerMatches") or []
        raw_headers = data.get("headers") or []
        assert isinstance(raw_matches, list) and isinstance(raw_headers, list)
        return cls(str(data.get("method", "")), str(data.get("path", "")),
                   str(data.get("host", "")), tuple(str(h) for h in raw_headers),
                   tuple(HeaderMatch(str(m["name"]), str(m.get("value", "")),
                                     str(m.get("mismatch", ""))) for m in raw_matches))


@dataclass(frozen=True, slots=True)
class Request:
    """What a rule looks at: method, request target, and headers (lower-case names)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key == lname:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one request: ``rule`` is the index of the allowing rule (None when
    denied); ``edits`` are header changes to apply (("add"|"delete"|"replace", name,
    value)); ``logs`` name header mismatches that were only logged."""

    allowed: bool
    rule: int | None = None
    edits: tuple[tuple[str, str, str], ...] = field(default=())
    logs: tuple[str, ...] = field(default=())


DENIED = Verdict(False)


def _header_present(request: Request, spec: str) -> bool:
    name, colon, value = spec.partition(":")
    found = request.header(name.strip())
    if found is None:
        return False
    return not colon or found.strip() == value.strip()


def rule_verdict(rule: HTTPRule, request: Request) -> Verdict | None:
    """The verdict of one rule, or None when it does not match the request."""
    if rule.method and not _compiled(rule.method).fullmatch(request.method):
        return None
    if rule.path and not _compiled(rule.path).fullmatch(request.target):
        return None
    if rule.host and not _compiled(rule.host, True).fullmatch(request.header("host") or ""):
        return None
    if not all(_header_present(request, h) for h in rule.headers):
        return None
    edits: list[tuple[str, str, str]] = []
    logs: list[str] = []
    for match in rule.header_matches:
        found = request.header(match.name)
        if found == match.value:
            continue
        action = match.mismatch
        if action == "":
            return None
        if action == "LOG":
            logs.append(match.name)
        elif action == "ADD":
            edits.append(("add", match.name, match.value))
        elif action == "DELETE":
            if found is not None:
                edits.append(("delete", match.name, found))
        else:  # REPLACE
            edits.append(("replace", match.name, match.value))
    return Verdict(True, None, tuple(edits), tuple(logs))


def evaluate(rules: Sequence[HTTPRule], request: Request) -> Verdict:
    """Allowed when any rule allows; ``rules`` empty means "no L7 restriction"."""
    if not rules:
        return Verdict(True)
    for index, rule in enumerate(rules):
        found = rule_verdict(rule, request)
        if found is not None:
            return Verdict(True, index, found.edits, found.logs)
    return DENIED
