"""What the proxy decides with: local endpoints' HTTP rules and the ipcache.

The agent pushes a full snapshot (endpoints by IP with their L7 tables, IP/CIDR →
identity) whenever policy or identities change. The store swaps it in atomically, so
each request is judged against one consistent version, and keeps it while the agent is
away (optionally persisted to a file so a proxy restart starts from the last one).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from villi.policy.entry import Direction
from villi.policy.http import Request, Verdict
from villi.policy.l7table import Decision, L7Entry, decide, select

WORLD_IDENTITY = 2


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    id: int
    ip: str
    identity: int
    l7: tuple[L7Entry, ...]
    #: (ingress, egress) default deny; a direction not enforced any more allows all
    enforced: tuple[bool, bool] = (True, True)


class _Ipcache:
    """Longest-prefix lookup of IP → identity over /32s and CIDR prefixes."""

    def __init__(self, entries: Mapping[str, int]) -> None:
        self._by_len: dict[int, dict[int, int]] = {}
        for prefix, identity in entries.items():
            net = ipaddress.IPv4Network(prefix, strict=False)
            self._by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = identity
        self._lengths = sorted(self._by_len, reverse=True)
        self._cache: dict[str, int] = {}

    def lookup(self, ip: str) -> int:
        found = self._cache.get(ip)
        if found is not None:
            return found
        address = int.from_bytes(socket.inet_aton(ip), "big")
        found = WORLD_IDENTITY
        for length in self._lengths:
            mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
            hit = self._by_len[length].get(address & mask)
            if hit is not None:
                found = hit
                break
        if len(self._cache) < 65536:  # the snapshot is immutable: cache per address
            self._cache[ip] = found
        return found


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    endpoints: Mapping[str, LocalEndpoint]
    ipcache: _Ipcache
    raw: Mapping[str, Any]


class SnapshotError(ValueError):
    """A snapshot from the agent (or the state file) is malformed."""


def parse_snapshot(data: Mapping[str, Any]) -> Snapshot:
    try:
        endpoints = {}
        for ep in data.get("endpoints", []):
            entries = tuple(L7Entry.from_wire(e) for e in ep.get("l7", []))
            enforced = ep.get("enforced", [True, True])
            endpoints[str(ep["ip"])] = LocalEndpoint(
                int(ep["id"]), str(ep["ip"]), int(ep.get("identity", 0)), entries,
                (bool(enforced[0]), bool(enforced[1])))
        ipcache = {str(k): int(v) for k, v in (data.get("ipcache") or {}).items()}
        for ep in endpoints.values():
            ipcache.setdefault(ep.ip, ep.identity)
        return Snapshot(int(data.get("version", 0)), endpoints, _Ipcache(ipcache), dict(data))
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise SnapshotError(f"bad policy snapshot: {exc!r}") from exc


EMPTY = parse_snapshot({})


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """Who a redirected connection is between, as far as policy is concerned."""

    direction: Direction
    endpoint: int  # the endpoint whose policy redirected (0: unknown)
    src_identity: int
    dst_identity: int


class PolicyStore:
    """The current snapshot, replaced whole; lookups never see a half-applied one."""

    def __init__(self, state_file: Path | None = None) -> None:
        self.state_file = state_file
        self.snapshot = EMPTY
        #: called with each new snapshot from the agent (the DNS proxy takes its rules)
        self.listeners: list[Callable[[Snapshot], None]] = []
        if state_file is not None and state_file.exists():
            try:
                self.snapshot = parse_snapshot(json.loads(state_file.read_text()))
            except (OSError, ValueError):
                self.snapshot = EMPTY  # a corrupt file must not stop the proxy

    def replace(self, data: Mapping[str, Any]) -> Snapshot:
        snapshot = parse_snapshot(data)
        self.snapshot = snapshot
        if self.state_file is not None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot.raw))
            os.replace(tmp, self.state_file)
        for listener in self.listeners:
            listener(snapshot)
        return snapshot

    def context(self, direction: Direction, src_ip: str, dst_ip: str) -> ConnectionContext:
        snap = self.snapshot
        local = snap.endpoints.get(dst_ip if direction is Direction.INGRESS else src_ip)
        return ConnectionContext(direction, local.id if local else 0,
                                 snap.ipcache.lookup(src_ip), snap.ipcache.lookup(dst_ip))

    def decide(self, direction: Direction, src_ip: str, dst_ip: str, port: int,
               request: Request) -> tuple[Decision, ConnectionContext]:
        """The verdict for one request against the rules in force now."""
        ctx = self.context(direction, src_ip, dst_ip)
        local = self.snapshot.endpoints.get(dst_ip if direction is Direction.INGRESS
                                            else src_ip)
        table: Sequence[L7Entry] = local.l7 if local else ()
        peer = ctx.src_identity if direction is Direction.INGRESS else ctx.dst_identity
        if local is not None and not local.enforced[int(direction)]:
            # The policy that redirected this connection is gone and the endpoint is
            # no longer enforced in this direction: every request is allowed.
            decision = Decision(Verdict(True))
        else:
            decision = decide(select(table, direction, peer, port), request)
        if direction is Direction.EGRESS and decision.verdict.allowed:
            # A same-node server's ingress L7 rules: the upstream connection is not
            # redirected a second time, so they are applied here (another node's proxy
            # applies them for remote servers).
            server = self.snapshot.endpoints.get(dst_ip)
            if server is not None and server.l7:
                applicable = select(server.l7, Direction.INGRESS, ctx.src_identity, port)
                if applicable:
                    ingress = decide(applicable, request)
                    if not ingress.verdict.allowed:
                        return ingress, ctx
        return decision, ctx
