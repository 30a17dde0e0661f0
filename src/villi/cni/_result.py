"""CNI results: built from the agent's endpoint, merged with ``prevResult``, and written
in the shape of the configuration's ``cniVersion``.

Shape differences handled here: before 1.0.0 each ``ips[]`` entry carries
``"version": "4"|"6"``; 1.1.0 adds ``interfaces[].mtu/socketPath/pciID`` and
``routes[].mtu/advmss/priority/table/scope``, which older versions must not see.
"""

from __future__ import annotations

from villi.cni._config import at_least
from villi.cni._errors import DECODE_FAILURE, CNIError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from villi.cni._config import NetConf
    from villi.cni._env import Invocation

GATEWAY = "169.254.1.1"
_IFACE_1_1 = ("mtu", "socketPath", "pciID")
_ROUTE_1_1 = ("mtu", "advmss", "priority", "table", "scope")


def _bad_prev(problem: str) -> CNIError:
    return CNIError(DECODE_FAILURE, "failed to decode prevResult", problem)


def _list_of_objects(prev: dict[str, Any], key: str, required: str) -> list[dict[str, Any]]:
    items = prev.get(key, [])
    if items is None:
        return []
    if not isinstance(items, list):
        raise _bad_prev(f"{key}: expected a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get(required), str):
            raise _bad_prev(f"{key}[{i}]: expected an object with a string {required!r}")
    return items


def parse_prev_result(value: object) -> dict[str, Any]:
    """Validate a ``prevResult`` (code 6 when it is not a CNI result)."""
    if not isinstance(value, dict):
        raise _bad_prev("expected a JSON object (a CNI result)")
    interfaces = _list_of_objects(value, "interfaces", "name")
    ips = _list_of_objects(value, "ips", "address")
    _list_of_objects(value, "routes", "dst")
    for i, ip in enumerate(ips):
        if "/" not in ip["address"]:
            raise _bad_prev(f"ips[{i}].address: {ip['address']!r} is not in CIDR notation")
        index = ip.get("interface")
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int)
            or not 0 <= index < len(interfaces)
        ):
            raise _bad_prev(f"ips[{i}].interface: {index!r} is not an index into interfaces")
    if "dns" in value and not isinstance(value["dns"], dict):
        raise _bad_prev("dns: expected an object")
    return value


def sandbox_interface(result: dict[str, Any], inv: Invocation) -> dict[str, Any] | None:
    """The interface ``CNI_IFNAME`` inside ``CNI_NETNS`` listed in ``result``, if any."""
    for iface in result.get("interfaces") or []:
        if iface.get("name") == inv.ifname and iface.get("sandbox") == inv.netns:
            return iface
    return None


def build(endpoint: dict[str, Any], inv: Invocation, conf: NetConf) -> dict[str, Any]:
    """The result of an ADD where villi created the interface."""
    interfaces: list[dict[str, Any]] = []
    host_ifname = endpoint.get("hostIfname")
    if isinstance(host_ifname, str) and host_ifname:
        host: dict[str, Any] = {"name": host_ifname}
        if endpoint.get("hostMac"):
            host["mac"] = endpoint["hostMac"]
        interfaces.append(host)
    pod: dict[str, Any] = {"name": inv.ifname}
    if endpoint.get("mac"):
        pod["mac"] = endpoint["mac"]
    pod["sandbox"] = inv.netns
    if conf.mtu is not None:
        pod["mtu"] = conf.mtu
    interfaces.append(pod)
    ipv4 = str(endpoint["ipv4"])
    gateway = endpoint.get("gateway") or GATEWAY
    return {
        "cniVersion": conf.cni_version,
        "interfaces": interfaces,
        "ips": [{
            "address": ipv4 if "/" in ipv4 else f"{ipv4}/32",
            "gateway": gateway,
            "interface": len(interfaces) - 1,
        }],
        "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
        "dns": dict(conf.dns),
    }


def merge(prev: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Chain: ``prev`` with villi's interfaces, addresses and routes appended.

    Indexes of villi's addresses are shifted past ``prev``'s interfaces; a route whose
    destination ``prev`` already has is not added twice; ``prev``'s DNS wins when set.
    """
    out = dict(prev)
    prev_ifaces = list(prev.get("interfaces") or [])
    offset = len(prev_ifaces)
    out["interfaces"] = prev_ifaces + ours["interfaces"]
    out["ips"] = list(prev.get("ips") or []) + [
        {**ip, "interface": ip["interface"] + offset} for ip in ours["ips"]
    ]
    routes = list(prev.get("routes") or [])
    have = {r.get("dst") for r in routes}
    out["routes"] = routes + [r for r in ours["routes"] if r["dst"] not in have]
    out["dns"] = prev.get("dns") or ours["dns"]
    return out


def for_version(result: dict[str, Any], version: str) -> dict[str, Any]:
    """``result`` in the shape of CNI ``version``."""
    out = dict(result)
    out["cniVersion"] = version
    legacy = not at_least(version, "1.0.0")
    modern = at_least(version, "1.1.0")
    ips = []
    for ip in result.get("ips") or []:
        ip = dict(ip)
        if legacy:
            ip["version"] = "6" if ":" in ip["address"] else "4"
        else:
            ip.pop("version", None)
        ips.append(ip)
    out["ips"] = ips
    if not modern:
        out["interfaces"] = [
            {k: v for k, v in i.items() if k not in _IFACE_1_1}
            for i in result.get("interfaces") or []
        ]
        out["routes"] = [
            {k: v for k, v in r.items() if k not in _ROUTE_1_1} for r in result.get("routes") or []
        ]
    return out
