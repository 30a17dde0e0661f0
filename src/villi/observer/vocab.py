"""Hubble's names for the datapath's numbers (one table, used by flows and metrics)."""

from __future__ import annotations

from villi.datapath.abi import DROP_REASON_TEXT

RESERVED_NAMES = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init",
                  6: "remote-node", 7: "kube-apiserver", 8: "ingress"}
OBS_POINTS = {0: "TO_ENDPOINT", 1: "TO_PROXY", 3: "TO_STACK", 5: "FROM_ENDPOINT"}
OBS_SUBTYPES = {0: "to-endpoint", 1: "to-proxy", 3: "to-stack", 5: "from-endpoint"}
EVENT_TYPES = {1: "drop", 4: "trace", 5: "policy-verdict"}
METRIC_TYPES = {1: "Drop", 4: "Trace", 5: "PolicyVerdict"}
PROTOCOLS = {1: "ICMPv4", 6: "TCP", 17: "UDP", 132: "SCTP"}
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv4": 1, "sctp": 132}
DIRECTIONS = {0: "INGRESS", 1: "EGRESS"}
MATCH_TYPES = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all"}
#: Policy match types as hubble prints them in ``policy-verdict:<match> <DIRECTION>``.
MATCH_TYPE_NAMES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all"}
#: The word hubble prints for a policy verdict instead of the flow's verdict.
POLICY_VERDICT_WORDS = {"FORWARDED": "ALLOWED", "REDIRECTED": "ALLOWED", "DROPPED": "DENIED",
                        "AUDIT": "AUDITED"}
EVENT_POLICY_VERDICT = 5
TCP_FLAGS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10))
#: ICMPv4 type names as Hubble prints them (gopacket's ICMPv4TypeCode names).
ICMP_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
              8: "EchoRequest", 9: "RouterAdvertisement", 10: "RouterSolicitation",
              11: "TimeExceeded", 12: "ParameterProblem", 13: "TimestampRequest",
              14: "TimestampReply", 15: "InfoRequest", 16: "InfoReply",
              17: "AddressMaskRequest", 18: "AddressMaskReply"}
TRACE_REASONS = {0: "NEW", 1: "ESTABLISHED", 2: "REPLY", 3: "RELATED"}


def drop_reason_name(code: int) -> str:
    return DROP_REASON_TEXT.get(code, (f"reason {code}", f"DROP_REASON_{code}"))[1]


def drop_reason_text(code: int) -> str:
    return DROP_REASON_TEXT.get(code, (f"reason {code}", ""))[0]
