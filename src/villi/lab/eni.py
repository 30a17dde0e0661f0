"""The lab's simulated cloud for ``villi lab up --ipam eni``.

The lab plays the cloud provider's part: it runs ``villi cloud-sim`` in the underlay
namespace (listening on the bridge address only, never in the root namespace),
creates an instance type and subnets there, and launches one instance per node tagged
``villi-node=<node>`` — which is how the operator finds a node's instance. The
operator gets ``--ipam eni --cloud-url``, the agents ``--ipam eni``.

Subnets lie inside the cluster CIDR (10.70.0.0/20 by default), so every namespace's
``unreachable`` route for the cluster CIDR covers them, and node routes for pod IPs are
/32s of IPs actually attached to that node.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from villi._nsenter import in_netns
from villi.lab import _procs
from villi.lab._state import LabError

CLOUD_PORT = 8800
NODE_TAG = "villi-node"  # as villi.operator.eni.NODE_TAG (the lab may not import operator)
INSTANCE_TYPE = "sim.small"
#: interfaces per instance x IPs per interface of the lab's instance type: 2 pod
#: interfaces (the primary one is the node's own) x 5 secondary IPs = 10 pods per node
DEFAULT_SHAPE = (3, 6)
SUBNETS = (("subnet-lab-a", "10.70.0.0/22"), ("subnet-lab-b", "10.70.4.0/22"))


def settings(ipam: str, latency_ms: float, rate_limit: float, release_delay_s: float,
             shape: tuple[int, int] = DEFAULT_SHAPE) -> dict[str, Any]:
    if ipam not in ("cluster-pool", "eni"):
        raise LabError(f"--ipam must be cluster-pool or eni, not {ipam!r}")
    if latency_ms < 0 or rate_limit < 0 or release_delay_s < 0:
        raise LabError("--cloud-latency, --cloud-rate-limit and --excess-ip-release-delay "
                       "must be >= 0")
    if shape[0] < 2 or shape[1] < 2:
        raise LabError("the lab's instance type needs >= 2 interfaces and >= 2 IPs each")
    return {"latency_ms": latency_ms, "rate_limit": rate_limit,
            "release_delay_s": release_delay_s, "shape": list(shape)}


def url(state: dict[str, Any]) -> str:
    return f"http://{state['underlay']['gateway']}:{CLOUD_PORT}"


def cloud_cmd(state: dict[str, Any], villi_cmd: Any) -> list[str]:
    cfg, d = state["cloud"], Path(state["dir"])
    topo = d / "cloud-topology.json"
    topo.write_text(json.dumps({
        "instanceTypes": [{"name": INSTANCE_TYPE, "maxInterfaces": cfg["shape"][0],
                           "ipsPerInterface": cfg["shape"][1]}],
        "subnets": [{"id": sid, "cidr": cidr} for sid, cidr in SUBNETS]}))
    args = ["--netns", state["underlay"]["netns"], "cloud-sim",
            "--listen", f"{state['underlay']['gateway']}:{CLOUD_PORT}",
            "--topology", str(topo), "--latency-ms", str(cfg["latency_ms"]),
            "--rate-limit", str(cfg["rate_limit"]), "--plumb-links", state["underlay"]["bridge"]]
    return list(villi_cmd(*args))


def operator_args(state: dict[str, Any]) -> list[str]:
    cfg = state["cloud"]
    return ["--ipam", "eni", "--cloud-url", url(state), "--cluster-name", state["cluster"],
            "--excess-ip-release-delay", str(cfg["release_delay_s"]),
            "--eni-gc-interval", "2", "--reclaim-grace", "5",
            "--cloud-api-qps", str(cfg["rate_limit"] or 20.0)]


def call(state: dict[str, Any], action: str, timeout: float = 10.0,
         **params: Any) -> dict[str, Any]:
    """One cloud API call from inside the underlay namespace (the lab's console)."""
    req = urllib.request.Request(f"{url(state)}/api/{action}",
                                 data=json.dumps(params).encode(),
                                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with in_netns(state["underlay"]["netns"]):
                with urllib.request.urlopen(req, timeout=5) as r:
                    doc: dict[str, Any] = json.loads(r.read())
                    return doc
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}").get("Error", {})
            if body.get("Code") == "RequestLimitExceeded" and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise LabError(f"cloud-sim {action}: {body.get('Code')}: "
                           f"{body.get('Message')}") from None
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise LabError(f"cloud-sim at {url(state)} did not answer {action}: {exc}"
                               ) from None
            time.sleep(0.1)


def _subnet_router(state: dict[str, Any]) -> None:
    """Give the underlay bridge each subnet's first address (the provider reserves it
    for its router): the underlay then reaches every pod IP on-link, answered by the
    interface that owns it, so "world" replies find pods whose IPs came after lab up."""
    import ipaddress

    from pyroute2.netlink.exceptions import NetlinkError

    from villi.netns._ipr import ipr_in

    with ipr_in(state["underlay"]["netns"]) as ipr:
        bridge = ipr.link_lookup(ifname=state["underlay"]["bridge"])[0]
        for _, cidr in SUBNETS:
            net = ipaddress.IPv4Network(cidr)
            try:
                ipr.addr("add", index=bridge, address=str(net.network_address + 1),
                         prefixlen=net.prefixlen)
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST
                    raise LabError(f"cannot add the subnet router {net}: {exc}") from exc


def start(state: dict[str, Any], villi_cmd: Any, timeout: float = 30.0) -> None:
    """Start cloud-sim and launch one instance per node."""
    d = Path(state["dir"])
    _subnet_router(state)
    pid = _procs.spawn(cloud_cmd(state, villi_cmd), d / "cloud-sim.log")
    state["processes"]["cloud-sim"] = {"pid": pid, "log": str(d / "cloud-sim.log")}
    call(state, "DescribeInstanceTypes", timeout=timeout)
    for node in state["nodes"]:
        doc = call(state, "RunInstances", InstanceType=INSTANCE_TYPE,
                   SubnetId=SUBNETS[0][0],
                   Tags={NODE_TAG: node["name"], "villi.io/netns": node["netns"]})
        node["instance_id"] = doc["Instance"]["InstanceId"]


def terminate(state: dict[str, Any], node: dict[str, Any]) -> None:
    """What the provider does when a node's VM goes: extra interfaces stay, detached."""
    if node.get("instance_id"):
        call(state, "TerminateInstances", InstanceIds=[node["instance_id"]])


def interfaces(state: dict[str, Any], node_name: str | None = None) -> list[dict[str, Any]]:
    """Every interface this cluster created (optionally only those of one node)."""
    tags = {"villi.io/cluster": state["cluster"]}
    if node_name is not None:
        tags[NODE_TAG] = node_name
    return list(call(state, "DescribeNetworkInterfaces", TagFilter=tags)
                .get("NetworkInterfaces", []))
