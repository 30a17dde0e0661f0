"""The network configuration on stdin: decoding, version negotiation, villi's options.

Plain classes rather than dataclasses or pydantic: the plugin starts once per pod and
``dataclasses`` alone imports ``inspect`` (~7 ms). Wrong values are code 7 and name the
field; stdin that is not a JSON object is code 6; an unknown ``cniVersion`` is code 1.
"""

from __future__ import annotations

import json
import re

from villi.agentclient import CONNECT_BACKOFF_CAP
from villi.cni._env import label_problem, port_problem
from villi.cni._errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    UNSUPPORTED_FIELD,
    CNIError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
PLUGIN_TYPE = "villi-cni"
DEFAULT_SOCKET = "/var/run/villi/villi.sock"
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 600.0

_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)


def decode(data: bytes) -> dict[str, Any]:
    """Decode stdin; code 6 unless it is one JSON object."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise CNIError(
            DECODE_FAILURE, "failed to decode the network configuration on stdin",
            f"not JSON: {e}" if data.strip() else "stdin is empty",
        ) from None
    if not isinstance(doc, dict):
        raise CNIError(DECODE_FAILURE, "failed to decode the network configuration on stdin",
                       f"expected a JSON object, got {type(doc).__name__}")
    return doc


def check_version(doc: dict[str, Any]) -> str:
    """The config's ``cniVersion`` if villi supports it, else code 1."""
    version = doc.get("cniVersion")
    if version in SUPPORTED_VERSIONS:
        return str(version)
    if version is None:
        detail = "the configuration has no \"cniVersion\" (which means 0.1.0)"
    else:
        detail = f"cniVersion {version!r} is not supported"
    raise CNIError(INCOMPATIBLE_VERSION, "incompatible CNI version",
                   f"{detail}; villi-cni supports {', '.join(SUPPORTED_VERSIONS)}")


def _invalid(field: str, problem: str) -> CNIError:
    return CNIError(INVALID_CONFIG, f"invalid network config: {field}: {problem}")


def _number(doc: dict[str, Any], field: str) -> float | None:
    value = doc.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(field, f"expected a number, got {json.dumps(value)}")
    return float(value)


def _dns(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("dns", "expected an object")
    out: dict[str, Any] = {}
    for key, val in value.items():
        if key == "domain":
            if not isinstance(val, str):
                raise _invalid("dns.domain", "expected a string")
        elif key in ("nameservers", "search", "options"):
            if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                raise _invalid(f"dns.{key}", "expected a list of strings")
        else:
            continue
        if val:
            out[key] = val
    return out


def _labels(value: object) -> dict[str, str]:
    """``args.cni.labels``: the CONVENTIONS list of {key, value}, or a plain object."""
    field = "args.cni.labels"
    if value is None:
        return {}
    if isinstance(value, dict):
        items = [(k, v, f"{field}.{k}") for k, v in value.items()]
    elif isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise _invalid(f"{field}[{i}]", 'expected {"key": ..., "value": ...}')
            items.append((item["key"], item.get("value", ""), f"{field}[{i}]"))
    else:
        raise _invalid(field, 'expected a list of {"key": ..., "value": ...}')
    labels = {}
    for key, val, where in items:
        if not isinstance(val, str):
            raise _invalid(where, f"label value must be a string, got {json.dumps(val)}")
        problem = label_problem(key, val)
        if problem:
            raise _invalid(where, problem)
        labels[key] = val
    return labels


def _ports(value: object) -> dict[str, dict[str, object]]:
    """``args.cni.ports``: [{"name", "containerPort" (or "port"), "protocol"}]."""
    field = "args.cni.ports"
    if value is None:
        return {}
    if not isinstance(value, list):
        raise _invalid(field, 'expected a list of {"name", "containerPort", "protocol"}')
    ports: dict[str, dict[str, object]] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _invalid(f"{field}[{i}]", 'expected {"name", "containerPort", "protocol"}')
        port = item.get("containerPort", item.get("port"))
        protocol = item.get("protocol", "TCP")
        problem = port_problem(item["name"], port, protocol)
        if problem:
            raise _invalid(f"{field}[{i}]", problem)
        ports[item["name"]] = {"port": port, "protocol": str(protocol).upper()}
    return ports


class NetConf:
    """The validated configuration of one invocation."""

    __slots__ = ("raw", "cni_version", "name", "agent_socket", "agent_timeout",
                 "agent_retry_cap", "mtu", "dns", "labels", "ports")

    def __init__(
        self, raw: dict[str, Any], environ: dict[str, str], *, agent_only: bool = False
    ) -> None:
        """Validate ``raw``; ``agent_only`` (DEL) checks just what reaching the agent needs.

        DEL must not fail because the configuration was edited after ADD (a pod could
        then never be deleted), so it only checks ``cniVersion``, ``agentSocket`` and
        ``agentTimeout`` and leaves the other fields at their defaults.
        """
        self.raw = raw
        self.cni_version = check_version(raw)

        socket_path = environ.get("VILLI_AGENT_SOCKET") or raw.get("agentSocket", DEFAULT_SOCKET)
        if not isinstance(socket_path, str) or not socket_path.startswith("/"):
            raise _invalid("agentSocket", f"expected an absolute path, got "
                           f"{json.dumps(socket_path)}")
        self.agent_socket = socket_path

        timeout = _number(raw, "agentTimeout")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise _invalid("agentTimeout", f"{timeout:g} is not between 0 and {MAX_TIMEOUT:g} s")
        self.agent_timeout = DEFAULT_TIMEOUT if timeout is None else timeout

        # The cap of the jittered connect retries while the agent restarts: a node's
        # pods retry spread over [0, cap] instead of together (the seed's herd lesson).
        cap = _number(raw, "agentRetryCap")
        if cap is not None and not 0 < cap <= MAX_TIMEOUT:
            raise _invalid("agentRetryCap", f"{cap:g} is not between 0 and {MAX_TIMEOUT:g} s")
        self.agent_retry_cap = CONNECT_BACKOFF_CAP if cap is None else cap

        self.name = str(raw.get("name", ""))
        self.mtu: int | None = None
        self.dns: dict[str, Any] = {}
        self.labels: dict[str, str] = {}
        self.ports: dict[str, dict[str, object]] = {}
        if not agent_only:
            self._validate(raw)

    def _validate(self, raw: dict[str, Any]) -> None:
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise CNIError(INVALID_CONFIG, "invalid network config: missing network name",
                           'the configuration needs "name"')
        if not _NETWORK_NAME.match(name):
            raise _invalid("name", f"{name!r} must start with a letter or digit, followed by "
                           "letters, digits, '_', '.' or '-'")
        kind = raw.get("type")
        if kind != PLUGIN_TYPE:
            raise _invalid("type", f"expected {PLUGIN_TYPE!r}, got {json.dumps(kind)}")
        if "ipam" in raw:
            raise CNIError(
                UNSUPPORTED_FIELD,
                f"unsupported field \"ipam\": {json.dumps(raw['ipam'])}",
                "villi-cni gets pod IPs from the villi agent's IPAM; remove \"ipam\"",
            )
        mtu = raw.get("mtu")
        if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)
                                or not 576 <= mtu <= 65535):
            raise _invalid("mtu", f"{json.dumps(mtu)} is not an integer between 576 and 65535")
        self.mtu = mtu
        self.dns = _dns(raw.get("dns"))
        args = raw.get("args")
        cni_args = args.get("cni") if isinstance(args, dict) else None
        if not isinstance(cni_args, dict):
            cni_args = {}
        self.labels = _labels(cni_args.get("labels"))
        self.ports = _ports(cni_args.get("ports"))
