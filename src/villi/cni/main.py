"""``villi-cni``: the CNI plugin (spec 0.3.0-1.1.0) that hands pods to the villi agent.

The runtime execs it per operation with ``CNI_*`` variables and the network
configuration on stdin. Each command is one or a few calls to the agent's unix-socket
API; the agent allocates the IP, plumbs the veth and writes the maps, and rolls back
itself when an ADD fails. Results and errors go to stdout as CNI JSON; the exit status
is 0 on success and 1 on error. See docs/cni.md.

Keep the imports light: this runs once per pod (docs/cni.md has the start-up budget).
"""

from __future__ import annotations

import json
import os
import sys

from villi.agentclient import AgentClient, AgentError
from villi.cni._config import LATEST, SUPPORTED_VERSIONS, NetConf, at_least, decode
from villi.cni._env import Invocation, parse_cni_args
from villi.cni._errors import (
    AGENT_ERROR,
    CHECK_FAILED,
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL_ERROR,
    INVALID_CONFIG,
    IO_FAILURE,
    LIMITED_CONNECTIVITY,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CNIError,
)
from villi.cni._result import build, for_version, merge, parse_prev_result, sandbox_interface
from villi.errors import AgentUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BAD_STATES = ("failed", "invalid", "disconnecting", "disconnected")


def _agent_failed(e: AgentError, action: str) -> CNIError:
    """The agent's answer as a CNIError: its own code if it gave one, 503 → 11, else 100."""
    code = e.code or (TRY_AGAIN_LATER if e.status == 503 else AGENT_ERROR)
    details = f"HTTP {e.status} from the agent" if e.status else ""
    return CNIError(code, f"villi agent could not {action}: {e.message}", details)


def _unavailable(e: AgentUnavailable, code: int = TRY_AGAIN_LATER) -> CNIError:
    return CNIError(code, str(e))


def _client(conf: NetConf) -> AgentClient:
    return AgentClient(conf.agent_socket, conf.agent_timeout, retry_cap=conf.agent_retry_cap)


def _require_netns(inv: Invocation) -> None:
    if not os.path.exists(inv.netns):
        raise CNIError(UNKNOWN_CONTAINER, f"network namespace {inv.netns} does not exist",
                       f"container {inv.container_id}")


def cmd_add(inv: Invocation, conf: NetConf) -> dict[str, Any]:
    inv.require("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    pod = parse_cni_args(inv.args)
    prev = parse_prev_result(conf.raw["prevResult"]) if "prevResult" in conf.raw else None
    if prev is not None and sandbox_interface(prev, inv) is not None:
        raise CNIError(
            INVALID_CONFIG,
            f"interface {inv.ifname} in {inv.netns} was created by an earlier plugin",
            "villi-cni creates the pod's interface itself; put it first in \"plugins\"",
        )
    _require_netns(inv)
    request: dict[str, object] = {
        "containerID": inv.container_id,
        "netns": inv.netns,
        "ifname": inv.ifname,
        "labels": {**conf.labels, **pod.labels},
        "namedPorts": {**conf.ports, **pod.ports},
    }
    if pod.namespace:
        request["namespace"] = pod.namespace
    if pod.pod_name:
        request["podName"] = pod.pod_name
    if conf.mtu is not None:
        request["mtu"] = conf.mtu
    try:
        endpoint = _client(conf).create_endpoint(request)
    except AgentUnavailable as e:
        raise _unavailable(e) from e
    except AgentError as e:
        raise _agent_failed(e, f"add container {inv.container_id}") from e
    if not isinstance(endpoint.get("ipv4"), str) or not endpoint["ipv4"]:
        raise CNIError(AGENT_ERROR, "villi agent returned an endpoint without an IPv4 address",
                       json.dumps(endpoint)[:300])
    result = build(endpoint, inv, conf)
    if prev is not None:
        result = merge(prev, result)
    return for_version(result, conf.cni_version)


def cmd_del(inv: Invocation, conf: NetConf) -> None:
    # Best effort and idempotent: no netns or prevResult needed, 404 is success. An
    # unreachable agent is an error (11) so that the runtime retries: succeeding would
    # leak the IP and the veth.
    inv.require("CNI_CONTAINERID", "CNI_IFNAME")
    try:
        _client(conf).delete_endpoint(inv.container_id, inv.ifname, retry=True)
    except AgentUnavailable as e:
        raise _unavailable(e) from e
    except AgentError as e:
        raise _agent_failed(e, f"delete container {inv.container_id}") from e


def _check_failed(inv: Invocation, problem: str) -> CNIError:
    return CNIError(CHECK_FAILED, f"CHECK failed for container {inv.container_id} "
                    f"interface {inv.ifname}: {problem}")


def cmd_check(inv: Invocation, conf: NetConf) -> None:
    inv.require("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if not at_least(conf.cni_version, "0.4.0"):
        raise CNIError(INCOMPATIBLE_VERSION, "config version does not allow CHECK",
                       f"CHECK needs cniVersion 0.4.0 or later, got {conf.cni_version}")
    if "prevResult" not in conf.raw:
        raise CNIError(INVALID_CONFIG, "invalid network config: CHECK needs prevResult",
                       "the runtime must pass the result of the previous ADD")
    prev = parse_prev_result(conf.raw["prevResult"])
    _require_netns(inv)
    try:
        ep = _client(conf).get_endpoint(inv.container_id, inv.ifname)
    except AgentUnavailable as e:
        raise _unavailable(e) from e
    except AgentError as e:
        raise _agent_failed(e, f"look up container {inv.container_id}") from e
    if ep is None:
        raise _check_failed(inv, "the villi agent has no such endpoint")
    if ep.get("netns") and ep["netns"] != inv.netns:
        raise _check_failed(inv, f"the endpoint is in {ep['netns']}, not {inv.netns}")
    if str(ep.get("state", "")).lower() in _BAD_STATES:
        raise _check_failed(inv, f"the endpoint is {ep['state']}")
    pod = sandbox_interface(prev, inv)
    if pod is None:
        raise _check_failed(inv, f"prevResult lists no interface {inv.ifname} in {inv.netns}")
    if ep.get("mac") and pod.get("mac") and ep["mac"].lower() != str(pod["mac"]).lower():
        raise _check_failed(inv, f"MAC is {ep['mac']}, prevResult says {pod['mac']}")
    host = ep.get("hostIfname")
    if host and not any(i.get("name") == host and not i.get("sandbox")
                        for i in prev.get("interfaces") or []):
        raise _check_failed(inv, f"prevResult lists no host interface {host}")
    ipv4 = str(ep.get("ipv4") or "").split("/")[0]
    listed = [str(ip["address"]).split("/")[0] for ip in prev.get("ips") or []]
    if not ipv4 or ipv4 not in listed:
        raise _check_failed(inv, f"the endpoint has IPv4 {ipv4 or 'none'}, prevResult lists "
                            f"{', '.join(listed) or 'no addresses'}")


def _part(health: dict[str, Any], name: str) -> dict[str, Any]:
    part = health.get(name)
    return part if isinstance(part, dict) else {}


def cmd_status(inv: Invocation, conf: NetConf) -> None:
    if not at_least(conf.cni_version, "1.1.0"):
        raise CNIError(INCOMPATIBLE_VERSION, "config version does not allow STATUS",
                       f"STATUS needs cniVersion 1.1.0, got {conf.cni_version}")
    try:
        health = _client(conf).healthz()
    except AgentUnavailable as e:
        raise CNIError(NOT_AVAILABLE, str(e), "running pods keep the datapath's last "
                       "state; new pods cannot be added") from e
    except AgentError as e:
        raise CNIError(NOT_AVAILABLE, f"villi agent could not report its health: {e.message}",
                       f"HTTP {e.status} from the agent") from e
    datapath = _part(health, "datapath")
    if datapath.get("status") == "error":
        raise CNIError(LIMITED_CONNECTIVITY, "villi datapath is not working: "
                       f"{datapath.get('message') or 'no details'}",
                       "running pods may have limited connectivity")
    if health.get("status") == "error":
        broken = [f"{name}: {part.get('message') or part.get('status')}"
                  for name, part in health.items()
                  if isinstance(part, dict) and part.get("status") not in (None, "ok", "")]
        raise CNIError(NOT_AVAILABLE, "villi agent reports an error",
                       "; ".join(broken) or json.dumps(health)[:300])
    ipam = _part(health, "ipam")
    free = ipam.get("free")
    if not isinstance(free, int) and isinstance(ipam.get("capacity"), int) and isinstance(
            ipam.get("allocated"), int):
        free = ipam["capacity"] - ipam["allocated"]
    if isinstance(free, int) and free <= 0:
        raise CNIError(NOT_AVAILABLE, "villi agent has no free pod IPs",
                       str(ipam.get("status") or "no pod CIDR, or every address allocated"))


def _valid_attachments(raw: dict[str, Any]) -> tuple[set[tuple[str, str]], set[str]]:
    """(containerID, ifname) pairs, and container IDs listed without an ifname."""
    key = "cni.dev/valid-attachments"
    if key not in raw:
        key = "cni.dev/attachments"  # the name in the spec-v1.1.0 tag's text
    if key not in raw:
        raise CNIError(INVALID_CONFIG, "invalid network config: GC needs "
                       "\"cni.dev/valid-attachments\"",
                       "without the list villi-cni cannot tell stale endpoints from live ones")
    items = raw[key]
    if not isinstance(items, list):
        raise CNIError(DECODE_FAILURE, f"failed to decode {key}", "expected a list")
    pairs: set[tuple[str, str]] = set()
    whole: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise CNIError(DECODE_FAILURE, f"failed to decode {key}[{i}]",
                           'expected {"containerID": ..., "ifname": ...}')
        ifname = item.get("ifname")
        if isinstance(ifname, str) and ifname:
            pairs.add((item["containerID"], ifname))
        else:
            whole.add(item["containerID"])
    return pairs, whole


def cmd_gc(inv: Invocation, conf: NetConf) -> None:
    if not at_least(conf.cni_version, "1.1.0"):
        raise CNIError(INCOMPATIBLE_VERSION, "config version does not allow GC",
                       f"GC needs cniVersion 1.1.0, got {conf.cni_version}")
    pairs, whole = _valid_attachments(conf.raw)
    client = _client(conf)
    try:
        endpoints = client.list_endpoints()
    except AgentUnavailable as e:
        raise _unavailable(e) from e
    except AgentError as e:
        raise _agent_failed(e, "list endpoints") from e
    stale = [
        (ep["containerID"], str(ep.get("ifname") or "eth0"))
        for ep in endpoints
        if isinstance(ep.get("containerID"), str) and ep["containerID"]
        and ep["containerID"] not in whole
        and (ep["containerID"], str(ep.get("ifname") or "eth0")) not in pairs
    ]
    failures: list[str] = []
    code = AGENT_ERROR
    for cid, ifname in stale:
        try:
            client.delete_endpoint(cid, ifname)
        except AgentUnavailable as e:
            failures.append(f"{cid}/{ifname}: {e}")
            code = TRY_AGAIN_LATER
            break  # the agent is gone: the rest would fail the same way
        except AgentError as e:
            failures.append(f"{cid}/{ifname}: {e.message}")
    if failures:
        raise CNIError(code, f"GC could not remove {len(failures)} of {len(stale)} stale "
                       "attachments", "; ".join(failures))


def cmd_version(raw: dict[str, Any]) -> dict[str, Any]:
    asked = raw.get("cniVersion")
    return {
        "cniVersion": asked if asked in SUPPORTED_VERSIONS else LATEST,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def _read_stdin() -> bytes:
    try:
        return sys.stdin.buffer.read()
    except OSError as e:
        raise CNIError(IO_FAILURE, "failed to read the network configuration from stdin",
                       str(e)) from e


def run(environ: dict[str, str], reply: list[str]) -> dict[str, Any] | None:
    """Run one invocation; ``reply[0]`` is set to the version errors should be written in."""
    inv = Invocation(environ)
    inv.check_command()
    data = _read_stdin()
    if inv.command == "VERSION":
        try:
            raw = decode(data) if data.strip() else {}
        except CNIError:
            raw = {}
        return cmd_version(raw)
    raw = decode(data)
    if raw.get("cniVersion") in SUPPORTED_VERSIONS:
        reply[0] = str(raw["cniVersion"])
    conf = NetConf(raw, environ, agent_only=inv.command == "DEL")
    if inv.command == "ADD":
        return cmd_add(inv, conf)
    {"DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}[inv.command](
        inv, conf)
    return None


def main(argv: list[str] | None = None) -> int:
    del argv  # CNI plugins take no arguments
    reply = [LATEST]
    try:
        result = run(dict(os.environ), reply)
    except CNIError as e:
        out, status = e.to_json(reply[0]), 1
    except Exception as e:  # a bug: still answer in CNI's format, with the trace on stderr
        import traceback  # only on this path: it costs ~2 ms to import

        traceback.print_exc()
        out = CNIError(INTERNAL_ERROR, f"internal error in villi-cni: {e!r}").to_json(reply[0])
        status = 1
    else:
        if result is None:
            return 0
        out, status = result, 0
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
