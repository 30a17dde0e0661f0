"""DNS L7 records as Hubble shows them, and the wire-format helpers that fill them.

A record is what the proxy observed for one message: a request (query name and types)
or a response (plus IPs, the smallest TTL, CNAMEs, rcode and answer types), with the
verdict (FORWARDED, or DROPPED for a refused query) and the latency from query to
answer. :meth:`DNSRecord.to_flow` renders Hubble's flow JSON (``Type: L7``,
``l7 {type, latency_ns, dns {...}}``) so the observer can treat it like any flow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dnslib import CLASS, QTYPE, RCODE
from dnslib import DNSRecord as WireRecord

#: Hubble's rcode numbers are the DNS ones (0 NOERROR, 3 NXDOMAIN, 5 REFUSED).
RCODE_NAMES = {0: "NoError", 1: "FormErr", 2: "ServFail", 3: "NXDomain", 4: "NotImp",
               5: "Refused"}


@dataclass(slots=True)
class DNSRecord:
    """One L7 DNS observation (Hubble ``Layer7`` with a ``DNS`` record)."""

    kind: str                      # REQUEST | RESPONSE
    verdict: str                   # FORWARDED | DROPPED
    source: tuple[str, int]
    destination: tuple[str, int]
    protocol: str                  # UDP | TCP
    query: str
    qtypes: list[str]
    ips: list[str] = field(default_factory=list)
    ttl: int = 0
    cnames: list[str] = field(default_factory=list)
    rcode: int = 0
    rrtypes: list[str] = field(default_factory=list)
    latency_ns: int = 0
    time: float = field(default_factory=time.time)
    endpoint: str = ""
    observation_source: str = "proxy"

    def to_flow(self) -> dict[str, Any]:
        """Hubble's flow JSON for this record (the observer enriches pod names)."""
        l4 = self.protocol.upper()
        dns: dict[str, Any] = {"query": self.query, "qtypes": self.qtypes,
                               "observation_source": self.observation_source}
        if self.kind == "RESPONSE":
            dns.update(ips=self.ips, ttl=self.ttl, cnames=self.cnames, rcode=self.rcode,
                       rrtypes=self.rrtypes)
        secs, us = divmod(round(self.time * 1e6), 1_000_000)   # µs: exact in a float
        stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        stamp += f".{us * 1000:09d}Z"
        return {
            "time": stamp, "verdict": self.verdict, "Type": "L7",
            "IP": {"source": self.source[0], "destination": self.destination[0],
                   "ipVersion": "IPv4"},
            "l4": {l4: {"source_port": self.source[1],
                        "destination_port": self.destination[1]}},
            "l7": {"type": self.kind, "latency_ns": self.latency_ns, "dns": dns},
            "traffic_direction": "EGRESS", "is_reply": self.kind == "RESPONSE",
        }


def question(msg: WireRecord) -> tuple[str, list[str]]:
    """(query name in FQDN form, lower case; query types)."""
    if not msg.questions:
        return "", []
    name = str(msg.questions[0].qname).lower()
    return name if name.endswith(".") else name + ".", [QTYPE.get(q.qtype)
                                                        for q in msg.questions]


def answer_fields(msg: WireRecord) -> dict[str, Any]:
    """IPs (A and AAAA records, as Hubble lists them), minimum TTL, CNAMEs, rcode and
    rrtypes of a response."""
    ips, cnames, rrtypes, ttls = [], [], [], []
    for rr in msg.rr:
        if rr.rclass != CLASS.IN:
            continue
        rrtypes.append(QTYPE.get(rr.rtype))
        ttls.append(rr.ttl)
        if rr.rtype in (QTYPE.A, QTYPE.AAAA):
            ips.append(str(rr.rdata))
        elif rr.rtype == QTYPE.CNAME:
            cnames.append(str(rr.rdata).lower())
    return {"ips": ips, "ttl": min(ttls) if ttls else 0, "cnames": cnames,
            "rcode": msg.header.rcode, "rrtypes": rrtypes}


def a_records(msg: WireRecord) -> list[tuple[str, str, int]]:
    """(owner name, IP, TTL) of every A record (owners matter when CNAMEs chain)."""
    out = []
    for rr in msg.rr:
        if rr.rtype == QTYPE.A and rr.rclass == CLASS.IN:
            owner = str(rr.rname).lower()
            out.append((owner if owner.endswith(".") else owner + ".", str(rr.rdata),
                        rr.ttl))
    return out


def reject(msg: WireRecord, rcode: str) -> bytes:
    """The answer to a query no rule allows: REFUSED (Cilium's default) or NXDOMAIN."""
    reply = msg.reply()
    reply.header.rcode = RCODE.REFUSED if rcode == "refused" else RCODE.NXDOMAIN
    return reply.pack()
