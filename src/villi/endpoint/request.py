"""Validation of endpoint requests (CNI ADD, label PATCH) before anything is done.

Why a separate step: the agent allocates an IP, an identity and kernel state for a new
endpoint; a request that turns out to be malformed half-way leaked an IP per request
and, for labels, was saved to disk and crashed every later restart. Every field is
checked here first, with the same label rules the resource loader applies
(Kubernetes syntax), so a bad request fails with a message that names the field and
nothing is allocated, written or saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from villi.errors import EndpointError
from villi.policy._modelbase import check_label_key, check_label_value, check_name

MAX_LABELS = 256
_PROTOCOLS = ("TCP", "UDP", "SCTP")


class RequestError(EndpointError):
    """A request field is malformed; ``field`` names it (``labels['app x']``)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class EndpointRequest:
    """A CNI ADD request whose every field has the right type and syntax."""

    container_id: str
    netns: str
    ifname: str
    namespace: str
    pod_name: str | None
    labels: dict[str, str] = field(default_factory=dict)
    named_ports: dict[str, list[Any]] = field(default_factory=dict)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _string(req: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = req.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise RequestError(name, f"expected a non-empty string, got {_type_name(value)}")
    return value


def validate_labels(labels: Any, where: str = "labels") -> dict[str, str]:
    """``labels`` as a str→str dict in Kubernetes label syntax, or RequestError."""
    if not isinstance(labels, dict):
        raise RequestError(where, f"expected an object of string labels, got "
                                  f"{_type_name(labels)}")
    if len(labels) > MAX_LABELS:
        raise RequestError(where, f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        spot = f"{where}[{key!r}]"
        if not isinstance(value, str):
            raise RequestError(spot, f"label values must be strings, got {_type_name(value)}")
        try:
            check_label_key(key)
            check_label_value(value)
        except ValueError as exc:
            raise RequestError(spot, str(exc)) from None
    return dict(labels)


def _named_ports(value: Any) -> dict[str, list[Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError("namedPorts", f"expected an object, got {_type_name(value)}")
    out: dict[str, list[Any]] = {}
    for name, spec in value.items():
        spot = f"namedPorts[{name!r}]"
        if not isinstance(spec, dict):
            raise RequestError(spot, f"expected an object, got {_type_name(spec)}")
        port = spec.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise RequestError(spot + ".port", f"expected a port 1-65535, got {port!r}")
        proto = spec.get("protocol", "TCP")
        if not isinstance(proto, str) or proto.upper() not in _PROTOCOLS:
            raise RequestError(spot + ".protocol", f"expected one of {', '.join(_PROTOCOLS)}, "
                                                   f"got {proto!r}")
        out[name] = [port, proto.upper()]
    return out


def validate_endpoint_request(req: Any) -> EndpointRequest:
    """Check a CNI ADD body completely; raises RequestError naming the first bad field."""
    if not isinstance(req, dict):
        raise RequestError("body", f"expected a JSON object, got {_type_name(req)}")
    cid = _string(req, "containerID", required=True)
    netns = _string(req, "netns", required=True)
    ifname = _string(req, "ifname", required=True)
    assert cid is not None and netns is not None and ifname is not None
    if len(ifname) > 15 or "/" in ifname or ifname in (".", ".."):
        raise RequestError("ifname", f"{ifname!r} is not a valid interface name")
    namespace = _string(req, "namespace", required=False) or "default"
    pod_name = _string(req, "podName", required=False) or None
    for name, value in (("namespace", namespace), ("podName", pod_name)):
        if value is None:
            continue
        try:
            check_name(value)
        except ValueError as exc:
            raise RequestError(name, str(exc)) from None
    if len(namespace) > 63:
        raise RequestError("namespace", "at most 63 characters")
    labels = validate_labels(req["labels"]) if req.get("labels") is not None else {}
    return EndpointRequest(cid, netns, ifname, namespace, pod_name, labels,
                           _named_ports(req.get("namedPorts")))
