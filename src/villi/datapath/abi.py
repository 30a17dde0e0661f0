"""Python mirror of ``bpf/lib/common.h``: constants and struct layouts.

This is the one place Python learns the datapath's vocabulary (drop reasons, event
types, observation points, reserved identities, flags) and its binary layouts (map
keys and values, the flow event record). ``tests/unit/test_abi.py`` parses the C header
and the BTF clang emits and fails when the two sides disagree.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any

import numpy as np

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class ReservedIdentity(enum.IntEnum):
    UNKNOWN = 0
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8


class Dir(enum.IntEnum):
    INGRESS = 0
    EGRESS = 1


class DropReason(enum.IntEnum):
    """Cilium's drop reason numbers (the ones villi's datapath emits)."""

    FORWARDED = 0
    INVALID_SIP = 132
    POLICY = 133
    INVALID = 134
    CT_INVALID_HDR = 135
    UNKNOWN_L3 = 139
    UNKNOWN_L4 = 142
    UNKNOWN_TARGET = 150
    CT_CREATE_FAILED = 155
    FRAG_NOSUPPORT = 157
    NO_SERVICE = 158
    UNSUPPORTED_L2 = 166
    PROXY_LOOKUP_FAILED = 178
    PROXY_SET_FAILED = 179
    POLICY_DENY = 181
    CONTROL_PLANE = 190  # villi's own (guarded.h)


#: Cilium's description and Hubble's enum name of each drop reason.
DROP_REASON_TEXT: dict[int, tuple[str, str]] = {
    0: ("Forwarded", "DROP_REASON_UNKNOWN"),
    132: ("Invalid source ip", "INVALID_SOURCE_IP"),
    133: ("Policy denied", "POLICY_DENIED"),
    134: ("Invalid packet", "INVALID_PACKET_DROPPED"),
    135: ("CT: Truncated or invalid header", "CT_TRUNCATED_OR_INVALID_HEADER"),
    139: ("Unsupported L3 protocol", "UNSUPPORTED_L3_PROTOCOL"),
    142: ("Unknown L4 protocol", "UNKNOWN_L4_PROTOCOL"),
    150: ("Unknown L3 target address", "UNKNOWN_L3_TARGET_ADDRESS"),
    155: ("CT: Map insertion failed", "CT_MAP_INSERTION_FAILED"),
    157: ("IP fragmentation not supported", "IP_FRAGMENTATION_NOT_SUPPORTED"),
    158: ("Service backend not found", "SERVICE_BACKEND_NOT_FOUND"),
    166: ("Unsupported L2 protocol", "UNSUPPORTED_L2_PROTOCOL"),
    178: ("Proxy lookup failed", "SOCKET_LOOKUP_FAILED"),
    179: ("Proxy assignment failed", "SOCKET_ASSIGN_FAILED"),
    181: ("Policy denied by denylist", "POLICY_DENY"),
    190: ("Control plane not allowed by policy", "CONTROL_PLANE_DENIED"),
}


class EventType(enum.IntEnum):
    DROP = 1
    TRACE = 4
    POLICY_VERDICT = 5


class ObsPoint(enum.IntEnum):
    TO_LXC = 0
    TO_PROXY = 1
    TO_STACK = 3
    FROM_LXC = 5


OBS_POINT_NAME = {0: "TO_ENDPOINT", 1: "TO_PROXY", 3: "TO_STACK", 5: "FROM_ENDPOINT"}


class CtState(enum.IntEnum):
    NEW = 0
    ESTABLISHED = 1
    REPLY = 2
    RELATED = 3


class MatchType(enum.IntEnum):
    NONE = 0
    L3_ONLY = 1
    L3_L4 = 2
    L4_ONLY = 3
    ALL = 4


class Aggregation(enum.IntEnum):
    NONE = 0
    LOW = 1
    MEDIUM = 2
    MAXIMUM = 3


EP_F_INGRESS_ENFORCED = 0x01
EP_F_EGRESS_ENFORCED = 0x02
EP_F_INGRESS_LOOKUP = 0x04
EP_F_EGRESS_LOOKUP = 0x08
EP_F_AUDIT = 0x10


class Enforcement(enum.IntEnum):
    """The agent's ``--enable-policy`` (Cilium's modes), slot POLICY_CFG_ENFORCEMENT."""

    DEFAULT = 0
    ALWAYS = 1
    NEVER = 2


#: villi_policy_cfg slots (policy.h): one u32 each, each with one writer.
POLICY_CFG_ENFORCEMENT = 0
POLICY_CFG_AUDIT = 1
POLICY_CFG_DEGRADED = 2          # only `villi datapath policy degrade|restore` writes it
POLICY_CFG_CLUSTER_DEGRADED = 3  # the agent, from `villi policy degrade --all`
POLICY_CFG_SLOTS = 8

EVF_IS_REPLY = 0x01
EVF_REDIRECTED = 0x02
EVF_TO_PROXY = 0x04

#: L7 proxy redirection: marks (Cilium's MARK_MAGIC_*), CT flags, and the node's proxy
#: listener ports (villi-proxy's defaults; the policy map's proxy_port values).
MARK_MAGIC_MASK = 0x0F00
MARK_MAGIC_TO_PROXY = 0x0200
MARK_MAGIC_FROM_PROXY = 0x0A00
CT_F_TO_PROXY = 0x01
CT_F_PROXY_RETURN = 0x02
PROXY_INGRESS_PORT = 15001
PROXY_EGRESS_PORT = 15002
#: villi-proxy's DNS listener (UDP and TCP): port-53 entries with ``rules.dns``.
PROXY_DNS_PORT = 15053
#: Node-namespace policy routing for marked packets (proven here; Cilium's numbers).
PROXY_ROUTE_TABLE = 2004

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

POLICY_STATIC_PREFIX = 72
POLICY_FULL_PREFIX = 96
METRICS_SLOTS = 512


class IpcacheKey(ctypes.Structure):
    _fields_ = [("prefixlen", c_u32), ("addr", c_u32)]


class IpcacheValue(ctypes.Structure):
    _fields_ = [("identity", c_u32), ("node_ip", c_u32)]


class GuardedKey(ctypes.Structure):
    _fields_ = [("addr", c_u32), ("dport", c_u16), ("protocol", c_u8), ("pad", c_u8)]


class EndpointKey(ctypes.Structure):
    _fields_ = [("addr", c_u32)]


class EndpointValue(ctypes.Structure):
    _fields_ = [("ifindex", c_u32), ("identity", c_u32), ("endpoint_id", c_u16),
                ("flags", c_u16), ("pod_mac", c_u8 * 6), ("host_mac", c_u8 * 6)]


class PolicyKey(ctypes.Structure):
    _fields_ = [("prefixlen", c_u32), ("endpoint_id", c_u32), ("identity", c_u32),
                ("direction", c_u8), ("protocol", c_u8), ("dport", c_u16), ("pad", c_u32)]


class PolicyValue(ctypes.Structure):
    _fields_ = [("deny", c_u8), ("match_type", c_u8), ("proxy_port", c_u16), ("cookie", c_u32),
                ("packets", c_u64), ("bytes", c_u64)]


class CtKey(ctypes.Structure):
    _fields_ = [("saddr", c_u32), ("daddr", c_u32), ("sport", c_u16), ("dport", c_u16),
                ("protocol", c_u8), ("direction", c_u8), ("pad", c_u16)]


class CtValue(ctypes.Structure):
    _fields_ = [("packets", c_u64), ("bytes", c_u64), ("expires", c_u32),
                ("last_report", c_u32), ("peer_identity", c_u32), ("cookie", c_u32),
                ("endpoint_id", c_u16), ("tx_flags_seen", c_u8), ("rx_flags_seen", c_u8),
                ("closing", c_u8), ("proxy_flags", c_u8), ("proxy_port", c_u16)]


class FlowEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", c_u64), ("src_ip", c_u32), ("dst_ip", c_u32),
        ("src_identity", c_u32), ("dst_identity", c_u32),
        ("sport", c_u16), ("dport", c_u16), ("len", c_u32), ("cookie", c_u32),
        ("ifindex", c_u32), ("endpoint_id", c_u16), ("protocol", c_u8), ("tcp_flags", c_u8),
        ("event_type", c_u8), ("drop_reason", c_u8), ("direction", c_u8), ("obs_point", c_u8),
        ("ct_state", c_u8), ("match_type", c_u8), ("flags", c_u8),
        ("icmp_type", c_u8), ("icmp_code", c_u8), ("audit_reason", c_u8), ("pad", c_u8 * 2),
    ]


class MetricsValue(ctypes.Structure):
    _fields_ = [("packets", c_u64), ("bytes", c_u64)]


def _dtype_of(struct: type[ctypes.Structure]) -> np.dtype:
    """A numpy dtype with the same names, offsets and size as a ctypes struct."""
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    fields: list[tuple[str, Any]] = list(struct._fields_)  # type: ignore[arg-type]
    for name, ctype in fields:
        field = getattr(struct, name)
        names.append(name)
        offsets.append(field.offset)
        if issubclass(ctype, ctypes.Array):
            formats.append((np.dtype(f"u{ctypes.sizeof(ctype._type_)}"), ctype._length_))
        else:
            formats.append(np.dtype(f"u{ctypes.sizeof(ctype)}"))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": ctypes.sizeof(struct)})


#: Flow records as a numpy structured dtype, for vectorised decoding of the ringbuf.
FLOW_EVENT_DTYPE = _dtype_of(FlowEvent)

#: Every struct shared with C, by its C name (checked against BTF by the tests).
SHARED_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "ipcache_key": IpcacheKey, "ipcache_value": IpcacheValue, "guarded_key": GuardedKey,
    "endpoint_key": EndpointKey, "endpoint_value": EndpointValue,
    "policy_key": PolicyKey, "policy_value": PolicyValue,
    "ct_key": CtKey, "ct_value": CtValue,
    "flow_event": FlowEvent, "metrics_value": MetricsValue,
}


# --- socket load balancing (lb.h) -------------------------------------------------
LB_SVC_F_AFFINITY = 0x01


class LbServiceKey(ctypes.Structure):
    _fields_ = [("address", c_u32), ("dport", c_u16), ("slot", c_u16), ("protocol", c_u8),
                ("pad", c_u8 * 3)]


class LbServiceValue(ctypes.Structure):
    _fields_ = [("backend_id", c_u32), ("affinity_timeout", c_u32), ("count", c_u16),
                ("service_id", c_u16), ("flags", c_u8), ("pad", c_u8 * 3)]


class LbBackend(ctypes.Structure):
    _fields_ = [("address", c_u32), ("port", c_u16), ("service_id", c_u16)]


class LbRevnatKey(ctypes.Structure):
    _fields_ = [("cookie", c_u64), ("address", c_u32), ("port", c_u16), ("pad", c_u16)]


class LbRevnatValue(ctypes.Structure):
    _fields_ = [("address", c_u32), ("port", c_u16), ("service_id", c_u16)]


class LbAffinityKey(ctypes.Structure):
    _fields_ = [("netns_cookie", c_u64), ("service_id", c_u16), ("pad", c_u16 * 3)]


class LbAffinityValue(ctypes.Structure):
    _fields_ = [("last_used_ns", c_u64), ("backend_id", c_u32), ("pad", c_u32)]


SHARED_STRUCTS.update({
    "lb_service_key": LbServiceKey, "lb_service_value": LbServiceValue,
    "lb_backend": LbBackend, "lb_revnat_key": LbRevnatKey, "lb_revnat_value": LbRevnatValue,
    "lb_affinity_key": LbAffinityKey, "lb_affinity_value": LbAffinityValue,
})
