"""DNS names in policy: ``toFQDNs`` selectors and ``toPorts[].rules.dns`` (Cilium semantics).

Both use the same selector, ``matchName`` (one exact name) or ``matchPattern`` (``*``
matches any run of DNS characters except ``.``; ``*`` alone matches every name). Names
compare case-insensitively and in fully-qualified form, so the trailing dot is optional.
This module holds the model, its validation and the matching; it imports nothing else of
the policy package, so ``models`` (the YAML surface) and the DNS proxy (which matches
queries) both use it without a cycle.

How a ``toFQDNs`` selector selects peers: as the label selector ``fqdn:<pattern>``
(:func:`fqdn_selector`). The DNS proxy gives each IP learned for a matching name a local
CIDR identity whose labels are ``cidr:<ip>/32``, ``reserved:world`` and one
``fqdn:<pattern>`` per selector the name matched (:func:`fqdn_identity_labels`); the
selector cache then selects that identity like any other, incrementally, and the
resolver turns the change into policy map entries (a diff, never a rebuild).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from pydantic import model_validator

from villi.identity.labels import SOURCE_CIDR, SOURCE_FQDN, SOURCE_RESERVED, Label, LabelSet
from villi.policy._modelbase import FieldError, StrictModel
from villi.policy.selectors import EXISTS, Requirement, Selector

#: Characters ``*`` stands for (Cilium's ``allowedDNSCharsREGroup``).
DNS_CHARS = "[-a-zA-Z0-9_]"
_NAME_RE = re.compile(r"^[-a-zA-Z0-9_.]+$")
_PATTERN_RE = re.compile(r"^[-a-zA-Z0-9_.*]+$")
#: The port DNS rules apply to (a named port is accepted: it resolves per endpoint).
DNS_PORT = 53
MAX_NAME = 255


def to_fqdn(name: str) -> str:
    """Lower case, with exactly one trailing dot (``Api.Example.com`` → ``api.example.com.``)."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def check_name(name: str) -> str:
    """A ``matchName`` value, normalised; ValueError says what is wrong."""
    if not name:
        raise ValueError("must not be empty")
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a DNS name (letters, digits, '-', '_' and '.')")
    fq = to_fqdn(name)
    if len(fq) > MAX_NAME or ".." in fq or fq == ".":
        raise ValueError(f"{name!r} is not a valid DNS name")
    return fq


def check_pattern(pattern: str) -> str:
    """A ``matchPattern`` value, normalised; ValueError says what is wrong."""
    if not pattern:
        raise ValueError("must not be empty")
    if pattern.strip() == "*":
        return "*"
    if not _PATTERN_RE.match(pattern):
        raise ValueError(f"{pattern!r} is not a DNS pattern (letters, digits, '-', '_', '.' "
                         "and '*')")
    fq = to_fqdn(pattern)
    if len(fq) > MAX_NAME or ".." in fq or fq == ".":
        raise ValueError(f"{pattern!r} is not a valid DNS pattern")
    return fq


@lru_cache(maxsize=4096)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The anchored regex of a normalised pattern (``*`` alone: every name)."""
    if pattern == "*":
        return re.compile(rf"^({DNS_CHARS}+\.)+$|^\.$")
    parts = [re.escape(p) for p in pattern.split("*")]
    return re.compile("^" + f"{DNS_CHARS}*".join(parts) + "$")


def matches(pattern: str, name: str) -> bool:
    """Does the normalised ``pattern`` (a name or a pattern) match ``name``?"""
    return pattern_regex(pattern).match(to_fqdn(name)) is not None


class FQDNSelector(StrictModel):
    """``toFQDNs[]`` and ``rules.dns[]``: exactly one of matchName / matchPattern."""

    match_name: str | None = None
    match_pattern: str | None = None

    @model_validator(mode="after")
    def _check(self) -> FQDNSelector:
        if (self.match_name is None) == (self.match_pattern is None):
            raise FieldError("give exactly one of matchName or matchPattern",
                             "matchPattern" if self.match_pattern is not None else "matchName")
        try:
            if self.match_name is not None:
                check_name(self.match_name)
            else:
                check_pattern(self.match_pattern or "")
        except ValueError as exc:
            raise FieldError(str(exc), "matchName" if self.match_name is not None
                             else "matchPattern") from None
        return self

    @property
    def pattern(self) -> str:
        """The normalised pattern (a matchName is a pattern without ``*``)."""
        if self.match_name is not None:
            return check_name(self.match_name)
        return check_pattern(self.match_pattern or "")

    def matches(self, name: str) -> bool:
        return matches(self.pattern, name)


def fqdn_selector(pattern: str) -> Selector:
    """The peer selector of one ``toFQDNs`` entry: identities labelled ``fqdn:<pattern>``."""
    return Selector((Requirement(SOURCE_FQDN, pattern, EXISTS),))


def fqdn_identity_labels(ip: str, patterns: frozenset[str] | set[str]) -> LabelSet:
    """Labels of the local identity of a learned IP: ``cidr:<ip>/32``, ``reserved:world``
    and ``fqdn:<pattern>`` for each selector pattern a name resolving to it matched."""
    labels = [Label(SOURCE_CIDR, f"{ip}/32", ""), Label(SOURCE_RESERVED, "world", "")]
    labels += [Label(SOURCE_FQDN, p, "") for p in sorted(patterns)]
    return LabelSet(tuple(labels))


def check_dns_ports(ports: list, path: tuple[str | int, ...] = ()) -> None:
    """DNS rules only make sense on the DNS port: 53 (or a named port), UDP/TCP/ANY."""
    for i, pp in enumerate(ports):
        number = pp.number
        if number is not None and number != DNS_PORT:
            raise FieldError(f"DNS rules apply to port {DNS_PORT}, not "
                             f"{number or 'all ports'}", *path, "ports", i, "port")
        if pp.protocol not in ("UDP", "TCP", "ANY"):
            raise FieldError(f"DNS rules need protocol UDP, TCP or ANY, not {pp.protocol}",
                             *path, "ports", i, "protocol")


@dataclass(frozen=True, slots=True)
class DNSRuleSet:
    """Compiled ``rules.dns`` of one port rule: the patterns a query must match."""

    patterns: tuple[str, ...]

    def allows(self, qname: str) -> bool:
        return any(matches(p, qname) for p in self.patterns)

    @classmethod
    def of(cls, selectors: list[FQDNSelector]) -> DNSRuleSet:
        return cls(tuple(dict.fromkeys(s.pattern for s in selectors)))


__all__ = ["DNS_CHARS", "DNS_PORT", "DNSRuleSet", "FQDNSelector", "check_dns_ports",
           "check_name", "check_pattern", "fqdn_identity_labels", "fqdn_selector", "matches",
           "pattern_regex", "to_fqdn"]
