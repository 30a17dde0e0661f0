"""L7 records: what the proxy saw per request and per response, for the agent's observer.

Shaped after Cilium's access-log record / Hubble's ``Layer7``: a REQUEST record with
the verdict (FORWARDED or DROPPED) and a RESPONSE record with the status code and the
latency since the request. Plain data with a JSON wire form (the control socket).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REQUEST = "REQUEST"
RESPONSE = "RESPONSE"
FORWARDED = "FORWARDED"
DROPPED = "DROPPED"
ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class L7Record:
    """One L7 event. ``direction`` is the redirect's (``ingress`` = the policy of the
    server endpoint, ``egress`` = of the client endpoint); ``endpoint`` is that endpoint's
    id; ``cookie``/``rule_index`` name the HTTP rule that decided (0/-1: none)."""

    type: str
    time_ns: int
    direction: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    src_identity: int
    dst_identity: int
    endpoint: int
    verdict: str
    method: str
    url: str
    protocol: str = "HTTP/1.1"
    code: int = 0
    latency_ns: int = 0
    cookie: int = 0
    rule_index: int = -1
    headers: tuple[tuple[str, str], ...] = field(default=())

    def to_wire(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies and costs more than the request itself
        return {"type": self.type, "time_ns": self.time_ns, "direction": self.direction,
                "src_ip": self.src_ip, "src_port": self.src_port, "dst_ip": self.dst_ip,
                "dst_port": self.dst_port, "src_identity": self.src_identity,
                "dst_identity": self.dst_identity, "endpoint": self.endpoint,
                "verdict": self.verdict, "method": self.method, "url": self.url,
                "protocol": self.protocol, "code": self.code, "latency_ns": self.latency_ns,
                "cookie": self.cookie, "rule_index": self.rule_index,
                "headers": [list(h) for h in self.headers]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> L7Record:
        data = dict(data)
        data["headers"] = tuple(tuple(h) for h in data.get("headers") or ())
        return cls(**data)
