"""Which agents the relay reads: static ``NAME=HOST:PORT`` peers or the kvstore's nodes.

Hubble Relay learns peers from the agents' Peer service; villi's agents already publish
their node entry (with its underlay IPv4) in the kvstore, so the relay lists those and
adds the agents' flow port. Static peers serve tests and hosts without a shared store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from villi.errors import VilliError

NODES_PREFIX = "villi/state/nodes/v1/"
DEFAULT_AGENT_PORT = 4244


@dataclass(frozen=True)
class Peer:
    name: str
    address: str   # HOST:PORT of the agent's TCP flow endpoint

    def url(self, tls: bool = False) -> str:
        return f"{'https' if tls else 'http'}://{self.address}"


def parse_peer(text: str) -> Peer:
    """``NAME=HOST:PORT`` → Peer, with an error that quotes the bad flag."""
    name, sep, addr = text.partition("=")
    host, colon, port = addr.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise VilliError(f"--peer {text!r}: expected NAME=HOST:PORT")
    return Peer(name, addr)


def peers_from_entries(entries: dict[str, dict[str, Any]], port: int) -> list[Peer]:
    """Peers from the kvstore's node entries (nodes without an IPv4 are skipped)."""
    return [Peer(name, f"{e['ipv4']}:{port}") for name, e in sorted(entries.items())
            if e.get("ipv4")]


async def discover(store: Any, port: int) -> list[Peer]:
    """The live nodes of the cluster, from the kvstore."""
    res = await store.list(NODES_PREFIX)
    entries = {}
    for kv in res.items:
        try:
            entries[kv.key[len(NODES_PREFIX):]] = json.loads(kv.value)
        except ValueError:
            continue
    return peers_from_entries(entries, port)
