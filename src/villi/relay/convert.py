"""villi's flow dicts ↔ Hubble's protobuf messages, and Hubble filters → villi filters.

villi's flows already use Hubble's JSON field names, so a flow converts with protobuf's
JSON parser, one top-level field at a time: a field villi adds (``villi``) or a value
the trimmed .proto does not know is skipped without losing the rest of the flow.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from villi.observer.filters import FilterSpec, Predicate
from villi.relay.proto import flow_pb2

# FlowFilter field → villi filter field (values pass through as strings)
FILTER_FIELDS = {
    "source_ip": "from-ip", "destination_ip": "to-ip",
    "source_pod": "from-pod", "destination_pod": "to-pod",
    "source_label": "from-label", "destination_label": "to-label",
    "source_port": "from-port", "destination_port": "to-port",
    "source_identity": "from-identity", "destination_identity": "to-identity",
    "verdict": "verdict", "protocol": "protocol", "traffic_direction": "traffic-direction",
    "node_name": "node",
}


class UnsupportedFilter(ValueError):
    """A Hubble filter field villi cannot evaluate (answered INVALID_ARGUMENT)."""


def to_proto(flow: dict[str, Any]) -> flow_pb2.Flow:
    msg = flow_pb2.Flow()
    for key, value in flow.items():
        if key == "villi":
            continue
        part = flow_pb2.Flow()
        try:
            json_format.ParseDict({key: value}, part, ignore_unknown_fields=True)
        except json_format.ParseError:
            continue
        msg.MergeFrom(part)
    return msg


def _values(field: str, values: Any) -> list[str]:
    if field == "verdict":
        return [flow_pb2.Verdict.Name(v) for v in values]
    if field == "traffic_direction":
        return [flow_pb2.TrafficDirection.Name(v) for v in values]
    return [str(v) for v in values]


def to_spec(f: flow_pb2.FlowFilter) -> FilterSpec:
    """One Hubble FlowFilter (AND of fields, OR of values) → a villi FilterSpec."""
    preds = []
    for desc, values in f.ListFields():
        name = FILTER_FIELDS.get(desc.name)
        if name is None:
            raise UnsupportedFilter(f"FlowFilter.{desc.name} is not supported by villi; "
                                    f"supported: {', '.join(sorted(FILTER_FIELDS))}")
        preds.append(Predicate(name, _values(desc.name, values)))
    return FilterSpec(preds)
