"""What the policy engine produces: per-endpoint policy entries.

An entry is one row of an endpoint's policy map, before it is encoded for the
kernel. It is pure data so the resolver never imports the datapath: the endpoint layer
turns entries into map keys (port ranges become LPM prefixes there).

Wildcards: ``identity == 0`` matches any peer identity; ``protocol == 0`` matches any
protocol (and then every port); ``port == 0`` with ``end_port == 0`` matches any port.
A deny entry wins over every allow entry that matches the same packet.

L7: an allow entry with ``http`` rules redirects the matching connections to the node's
HTTP proxy, which enforces the rules per request. An allow without ``http`` on the same
key wins (no redirect), as in Cilium. An allow entry with ``dns`` set (a port-53 rule
with ``rules.dns``) redirects to the node's DNS proxy instead (UDP and TCP).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

from villi.identity.ids import IdentityID
from villi.policy.http import HTTPRule

EndpointID = NewType("EndpointID", int)

ANY_IDENTITY = IdentityID(0)


class Direction(enum.IntEnum):
    """Traffic direction as seen by the endpoint the entry belongs to (same as C)."""

    INGRESS = 0
    EGRESS = 1


class Protocol(enum.IntEnum):
    """IP protocol numbers; ANY (0) is the wildcard."""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    SCTP = 132


@dataclass(frozen=True, slots=True, order=True)
class PolicyEntry:
    """One allow or deny decision for (peer identity, protocol, port range, direction).

    ``port``..``end_port`` is an inclusive range; ``end_port == 0`` means just ``port``;
    ``port == 0`` means every port. ``cookie`` names the rule that produced the entry
    (an index the agent maps back to policy name/namespace for flow explanations).
    """

    identity: IdentityID
    direction: Direction
    protocol: Protocol = Protocol.ANY
    port: int = 0
    end_port: int = 0
    deny: bool = False
    cookie: int = 0
    #: L7 HTTP rules (allow entries only); non-empty = redirect to the proxy
    http: tuple[HTTPRule, ...] = ()
    #: ``rules.dns`` on this port: redirect to the node's DNS proxy
    dns: bool = False

    @property
    def redirect(self) -> bool:
        return (bool(self.http) or self.dns) and not self.deny

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """What identifies the row regardless of verdict and cookie."""
        return (int(self.identity), int(self.direction), int(self.protocol), self.port,
                self.end_port)
