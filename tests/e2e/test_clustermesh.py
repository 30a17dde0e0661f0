"""Issue 15 end-to-end: ClusterMesh with KVStoreMesh on one shared 2-cluster lab.

``villi lab up --clusters 2 --nodes 2``: clusters c1 (node1, node2) and c2 (node3,
node4), each with its own etcd, operator and kvstoremesh. The tests run in file order on
that one lab (labs are slow to make):

- cross-cluster pod-to-pod in both directions, identities in each cluster's range;
- policy by the cluster label (allow from c2 app=x, deny c1 app=x and c2 app=y);
- connections to c2's etcd: one from c1's kvstoremesh, none from c1's agents;
- fault isolation: c2's etcd stopped — c1's agents log nothing about it and open no
  connection to it, c1 pods keep reaching c2 pods under the same policy, ``villi
  status`` and ``villi lab status`` say c2 is not ready; after it returns, a pod added
  in c2 reaches c1's datapath;
- kvstoremesh restart and agent restart without drops (cilium#26462);
- global services (``service.cilium.io/global``, ``shared``, ``affinity``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e._lab import Lab, running_lab

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-from-c2-x, namespace: mesh}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: x, io.cilium.k8s.policy.cluster: c2}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "mesh", "--clusters", "2", "--nodes", "2",
                     timeout=300, require_clean_down=True) as lab:
        lab.ok("lab", "pod", "add", "mesh/server", "--node", "node1", "--labels",
               "app=server", "--serve", "80/tcp")
        lab.ok("lab", "pod", "add", "mesh/x1", "--node", "node2", "--labels", "app=x")
        lab.ok("lab", "pod", "add", "c2:mesh/x2", "--node", "node3", "--labels", "app=x",
               "--serve", "80/tcp")
        lab.ok("lab", "pod", "add", "c2:mesh/y2", "--node", "node4", "--labels", "app=y")
        yield lab


# --- helpers -----------------------------------------------------------------------------

def _c2(lab: Lab) -> dict[str, Any]:
    return lab.state["clusters"]["c2"]


def _pod(lab: Lab, ref: str) -> dict[str, Any]:
    if ref.startswith("c2:"):
        return _c2(lab)["pods"][ref[3:]]
    return lab.state["pods"][ref]


def _endpoint(lab: Lab, cluster_name: str, pod: str) -> dict[str, Any]:
    eps = json.loads(lab.ok("--cluster", cluster_name, "get", "endpoints", "-o", "json"))
    return next(e for e in eps if f"{e['namespace']}/{e['podName']}" == pod)


def _etcd_port(lab: Lab, name: str) -> int:
    return int(lab.state["etcd_port"] if name == "c1" else _c2(lab)["etcd_port"])


def _connections(netns: str, port: int) -> list[tuple[str, int | None]]:
    """(state, pid) of every TCP socket in ``netns`` toward the lab's etcd port."""
    res = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htanp", "dport", f"= :{port}"],
                         capture_output=True, text=True, check=True)
    out = []
    for line in res.stdout.splitlines():
        pid = re.search(r"pid=(\d+)", line)
        out.append((line.split()[0], int(pid.group(1)) if pid else None))
    return out


def _c1_nodes(lab: Lab) -> list[dict[str, Any]]:
    return lab.state["nodes"]


def _probe_all(lab: Lab, pairs: list[tuple[str, str, bool]]) -> None:
    for src, dst, expect in pairs:
        assert lab.eventually(src, dst, "80", expect, within=15), \
            f"{src} → {dst}: expected {'allowed' if expect else 'blocked'}"


# --- tests --------------------------------------------------------------------------------

def test_cross_cluster_pod_to_pod(lab: Lab) -> None:
    assert lab.eventually("mesh/x1", "c2:mesh/x2", "80", True, within=20)
    assert lab.eventually("c2:mesh/y2", "mesh/server", "80", True, within=20)
    # each cluster allocates in its own range (cluster id in bits 16-23)
    assert _endpoint(lab, "c1", "mesh/server")["identity"] >> 16 == 1
    assert _endpoint(lab, "c2", "mesh/x2")["identity"] >> 16 == 2
    labels = _endpoint(lab, "c2", "mesh/x2")["labels"]
    assert labels.get("app") == "x"
    idents = lab.ok("--cluster", "c2", "get", "identities")
    assert "io.cilium.k8s.policy.cluster=c2" in idents
    # c1's flows name the c2 pod and carry its c2 identity
    x2 = _pod(lab, "c2:mesh/x2")["ip"]
    out = lab.ok("observe", "--last", "200", "-o", "json")
    flows = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    dst = [f["destination"] for f in flows if (f.get("IP") or {}).get("destination") == x2]
    assert dst and dst[0].get("pod_name") == "x2", dst[:1]
    assert dst[0].get("identity", 0) >> 16 == 2
    assert dst[0].get("cluster_name") == "c2", dst[0]   # from its identity's cluster label


def test_one_relay_shows_the_flows_of_both_clusters(lab: Lab) -> None:
    """c1's relay finds c2's agents in the kvstoremesh cache (peers ``c2/node3``, as
    Cilium's Peer service names other clusters' nodes) and merges their flows; the UI's
    service map then keeps app=x of c1 and of c2 apart."""
    relay = lab.state["relay"]["http"]
    deadline = time.monotonic() + 30
    while True:
        status = json.loads(lab.ok("observe", "status", "--server", relay))
        names = {n["name"] for n in status["nodes"]}
        if {"c2/node3", "c2/node4"} <= names and status["num_unavailable_nodes"] == 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert {"node1", "node2"} <= names
    assert lab.eventually("mesh/x1", "c2:mesh/x2", "80", True, within=10)
    res = lab.run("observe", "--server", relay, "-o", "json", "--last", "300")
    assert res.returncode == 0, res.stderr
    flows = [json.loads(line)["flow"] for line in res.stdout.splitlines() if line.strip()]
    assert {"node3"} & {f["node_name"] for f in flows}, {f["node_name"] for f in flows}
    ui = lab.state["ui_url"]
    with urllib.request.urlopen(ui + "api/map?last=300", timeout=10) as r:
        cards = {c["id"]: c for c in json.loads(r.read())["cards"]}
    assert "c1/mesh/x" in cards and "c2/mesh/x" in cards, sorted(cards)


def test_cli_picks_the_cluster(lab: Lab) -> None:
    """``villi --cluster c2 status|observe`` talk to c2's agents, the default to c1's."""
    assert set(json.loads(lab.ok("status", "-o", "json"))) == {"node1", "node2"}
    assert set(json.loads(lab.ok("--cluster", "c2", "status", "-o", "json"))) == \
        {"node3", "node4"}
    out = lab.ok("--cluster", "c2", "observe", "--last", "50", "-o", "json")
    nodes = {json.loads(line).get("node_name") for line in out.splitlines() if line.strip()}
    assert nodes and nodes <= {"node3", "node4"}, nodes
    res = lab.run("--cluster", "c9", "get", "endpoints")
    assert res.returncode == 1 and "no such cluster" in res.stderr


def test_policy_by_cluster_label(lab: Lab) -> None:
    lab.apply(POLICY, "policy")
    _probe_all(lab, [("c2:mesh/x2", "mesh/server", True),
                     ("mesh/x1", "mesh/server", False),
                     ("c2:mesh/y2", "mesh/server", False)])


def test_only_kvstoremesh_connects_to_the_remote_etcd(lab: Lab) -> None:
    port = _etcd_port(lab, "c2")
    for node in _c1_nodes(lab):
        assert _connections(node["netns"], port) == [], node["name"]
    kvm = lab.state["processes"]["kvstoremesh"]["pid"]
    conns = [c for c in _connections(lab.state["underlay"]["netns"], port) if c[1] == kvm]
    assert conns and all(state == "ESTAB" for state, _ in conns)


def _log_size(path: str) -> int:
    return os.path.getsize(path)


def test_fault_isolation_remote_etcd_down(lab: Lab) -> None:
    port = _etcd_port(lab, "c2")
    logs = {n["name"]: (n["log"], _log_size(n["log"])) for n in _c1_nodes(lab)}
    lab.ok("lab", "etcd", "stop", "--cluster", "c2")
    try:
        deadline = time.monotonic() + 20
        seen_not_ready = False
        while time.monotonic() < deadline:
            for node in _c1_nodes(lab):   # sampled all along: no attempt, not even SYN
                assert _connections(node["netns"], port) == [], node["name"]
            status = json.loads(lab.run("status", "-o", "json").stdout)
            remotes = [r for h in status.values()
                       for r in (h.get("clustermesh") or {}).get("remotes", [])]
            if remotes and all(not r["ready"] for r in remotes):
                seen_not_ready = True
                break
            time.sleep(1)
        assert seen_not_ready, "c1's agents never reported c2 as not ready"
        assert "c2: not-ready" in lab.ok("status")
        lab_status = json.loads(lab.run("lab", "status", "-o", "json").stdout)
        assert lab_status["clusters"]["c1"]["remotes"]["c2"]["ready"] == 0
        # cached state keeps traffic and policy as they were
        _probe_all(lab, [("mesh/x1", "c2:mesh/x2", True),
                         ("c2:mesh/x2", "mesh/server", True),
                         ("c2:mesh/y2", "mesh/server", False),
                         ("mesh/x1", "mesh/server", False)])
        for node in _c1_nodes(lab):
            assert _connections(node["netns"], port) == [], node["name"]
        for name, (path, size) in logs.items():
            with open(path) as f:
                f.seek(size)
                new = f.read()
            bad = [line for line in new.splitlines()
                   if " ERROR " in line or " WARNING " in line or f":{port}" in line]
            assert not bad, f"{name} logged about the outage:\n" + "\n".join(bad)
        kvm_log = lab.state["processes"]["kvstoremesh"]["log"]
        with open(kvm_log) as f:
            assert "cluster c2 unreachable" in f.read()
    finally:
        lab.run("lab", "etcd", "start", "--cluster", "c2")
    # after c2's etcd is back, a change in c2 reaches c1's datapath
    lab.ok("lab", "pod", "add", "c2:mesh/x3", "--node", "node4", "--labels", "app=x")
    assert lab.eventually("c2:mesh/x3", "mesh/server", "80", True, within=20)
    deadline = time.monotonic() + 20
    while "c2: ready" not in lab.ok("status"):
        assert time.monotonic() < deadline, lab.ok("status")
        time.sleep(0.5)


class _Prober:
    """Probes a pair again and again in a thread; counts failures."""

    def __init__(self, lab: Lab, src: str, dst: str) -> None:
        self.lab, self.src, self.dst = lab, src, dst
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.lab.probe(self.src, self.dst, "80", timeout=2.0):
                self.ok += 1
            else:
                self.failed += 1

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _drops_from(lab: Lab, node: str, src_ip: str, since: float) -> list[dict[str, Any]]:
    """Policy drops of ``src_ip`` in ``node``'s flow export since ``since``."""
    path = os.path.join(lab.state["dir"], f"{node}-flows.jsonl")
    out = []
    with open(path) as f:
        for line in f:
            flow = json.loads(line)
            if flow.get("verdict") == "DROPPED" and \
                    (flow.get("IP") or {}).get("source") == src_ip:
                out.append(flow)
    return [f for f in out if _flow_time(f) >= since]


def _flow_time(flow: dict[str, Any]) -> float:
    from datetime import datetime

    t = flow.get("time", "")
    try:
        return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def test_kvstoremesh_restart_without_drops(lab: Lab) -> None:
    t0 = time.time()
    with _Prober(lab, "c2:mesh/x2", "mesh/server") as prober:
        time.sleep(1)
        lab.ok("lab", "kvstoremesh", "restart", "--cluster", "c1")
        time.sleep(8)
    assert prober.failed == 0 and prober.ok > 0
    assert _drops_from(lab, "node1", _pod(lab, "c2:mesh/x2")["ip"], t0) == []
    # the restarted kvstoremesh still follows c2
    lab.ok("lab", "pod", "label", "c2:mesh/y2", "app=x")
    assert lab.eventually("c2:mesh/y2", "mesh/server", "80", True, within=20)
    lab.ok("lab", "pod", "label", "c2:mesh/y2", "app=y")
    assert lab.eventually("c2:mesh/y2", "mesh/server", "80", False, within=20)


def test_agent_restart_without_drops(lab: Lab) -> None:
    t0 = time.time()
    with _Prober(lab, "c2:mesh/x2", "mesh/server") as prober:
        time.sleep(1)
        lab.ok("lab", "agent", "restart", "c1:node1")
        time.sleep(3)
    assert prober.failed == 0 and prober.ok > 0
    assert _drops_from(lab, "node1", _pod(lab, "c2:mesh/x2")["ip"], t0) == []
    with open(lab.state["nodes"][0]["log"]) as f:
        assert "clustermesh: remote clusters c2 synced" in f.read()
    _probe_all(lab, [("c2:mesh/y2", "mesh/server", False)])


# --- global services ----------------------------------------------------------------------

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: mesh
  annotations: {ANNOTATIONS}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80, protocol: TCP}]
"""


def _apply_service(lab: Lab, cluster_name: str, **annotations: str) -> None:
    text = SERVICE.replace("{ANNOTATIONS}", json.dumps(annotations))
    path = lab.state_path.parent / f"svc-{cluster_name}.yaml"
    path.write_text(text)
    lab.ok("--cluster", cluster_name, "apply", "-f", str(path))


def _vip(lab: Lab, cluster_name: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        svcs = json.loads(lab.ok("--cluster", cluster_name, "get", "services", "-o", "json"))
        svc = next((s for s in svcs if s["name"] == "web"), None)
        if svc and svc.get("clusterIP"):
            return str(svc["clusterIP"])
        assert time.monotonic() < deadline, svcs
        time.sleep(0.2)


def _replies(lab: Lab, pod: str, vip: str, n: int = 16) -> dict[str, int]:
    out: dict[str, int] = {}
    for _ in range(n):
        res = lab.run("lab", "exec", pod, "--", "curl", "-s", "-m", "2", f"http://{vip}/")
        text = res.stdout.strip() if res.returncode == 0 else "(failed)"
        out[text] = out.get(text, 0) + 1
    return out


def _eventually_replies(lab: Lab, pod: str, vip: str, want: set[str],
                        within: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + within
    while True:
        got = _replies(lab, pod, vip)
        if set(got) == want:
            return got
        assert time.monotonic() < deadline, f"{pod} → {vip}: {got}, want only {want}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def web(lab: Lab) -> Iterator[None]:
    lab.ok("lab", "pod", "add", "mesh/web1", "--node", "node1", "--labels", "app=web",
           "--serve", "80/tcp", "--http-reply", "from-c1")
    lab.ok("lab", "pod", "add", "c2:mesh/web2", "--node", "node3", "--labels", "app=web",
           "--serve", "80/tcp", "--http-reply", "from-c2")
    yield None


def test_global_service_spreads_over_both_clusters(lab: Lab, web: None) -> None:
    _apply_service(lab, "c1", **{"service.cilium.io/global": "true"})
    _apply_service(lab, "c2", **{"service.cilium.io/global": "true"})
    _eventually_replies(lab, "mesh/x1", _vip(lab, "c1"), {"from-c1", "from-c2"})
    _eventually_replies(lab, "c2:mesh/x2", _vip(lab, "c2"), {"from-c1", "from-c2"})


def test_global_service_affinity_local(lab: Lab, web: None) -> None:
    _apply_service(lab, "c1", **{"service.cilium.io/global": "true",
                                 "service.cilium.io/affinity": "local"})
    _eventually_replies(lab, "mesh/x1", _vip(lab, "c1"), {"from-c1"})
    # no local backend left: the remote ones serve
    lab.ok("lab", "pod", "label", "mesh/web1", "app=old")
    _eventually_replies(lab, "mesh/x1", _vip(lab, "c1"), {"from-c2"})
    lab.ok("lab", "pod", "label", "mesh/web1", "app=web")
    _eventually_replies(lab, "mesh/x1", _vip(lab, "c1"), {"from-c1"})


def test_global_service_shared_false(lab: Lab, web: None) -> None:
    _apply_service(lab, "c1", **{"service.cilium.io/global": "true"})
    _apply_service(lab, "c2", **{"service.cilium.io/global": "true",
                                 "service.cilium.io/shared": "false"})
    # c2 keeps its backends to itself, and still uses c1's
    _eventually_replies(lab, "mesh/x1", _vip(lab, "c1"), {"from-c1"})
    _eventually_replies(lab, "c2:mesh/x2", _vip(lab, "c2"), {"from-c1", "from-c2"})


def test_global_service_backends_survive_remote_etcd_outage(lab: Lab, web: None) -> None:
    _apply_service(lab, "c2", **{"service.cilium.io/global": "true"})
    vip = _vip(lab, "c1")
    _eventually_replies(lab, "mesh/x1", vip, {"from-c1", "from-c2"})
    lab.ok("lab", "etcd", "stop", "--cluster", "c2")
    try:
        assert set(_replies(lab, "mesh/x1", vip)) == {"from-c1", "from-c2"}
    finally:
        lab.ok("lab", "etcd", "start", "--cluster", "c2")


# --- L7 policy across clusters -------------------------------------------------------------

L7_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x2-http-from-c1, namespace: mesh}
spec:
  endpointSelector: {matchLabels: {app: x}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: x, io.cilium.k8s.policy.cluster: c1}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: "/public"}]}
"""


def _curl(lab: Lab, pod: str, dst: str, path: str) -> tuple[int, str]:
    res = lab.run("lab", "exec", pod, "--", "curl", "-s", "-m", "3",
                  f"http://{_pod(lab, dst)['ip']}{path}")
    return res.returncode, res.stdout.strip()


def test_l7_policy_in_c2_judges_requests_from_c1(lab: Lab) -> None:
    """c2's proxy knows c1's pods (their identities reach it through c2's kvstoremesh):
    an HTTP rule in c2 that allows GET /public from c1 app=x lets exactly that through,
    and c2's L7 flows name the c1 client."""
    path = lab.state_path.parent / "l7-c2.yaml"
    path.write_text(L7_POLICY)
    lab.ok("--cluster", "c2", "apply", "-f", str(path))
    try:
        deadline = time.monotonic() + 20
        while _curl(lab, "mesh/x1", "c2:mesh/x2", "/public") != \
                (0, "villi echo: GET /public"):
            assert time.monotonic() < deadline, _curl(lab, "mesh/x1", "c2:mesh/x2", "/public")
            time.sleep(0.5)
        assert _curl(lab, "mesh/x1", "c2:mesh/x2", "/private") == (0, "Access denied")
        code, _ = _curl(lab, "c2:mesh/y2", "c2:mesh/x2", "/public")
        assert code == 28   # not app=x of c1: dropped at L3/L4, curl times out
        x1 = _pod(lab, "mesh/x1")["ip"]
        deadline = time.monotonic() + 10
        private = f"http://{_pod(lab, 'c2:mesh/x2')['ip']}/private"
        while True:
            out = lab.ok("--cluster", "c2", "observe", "--type", "l7", "--last", "100",
                         "-o", "json")
            flows = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
            # the /private request, judged once the policy was in force (an earlier
            # request may reach the proxy before its snapshot names the peer: cf test_l7)
            denied = [f for f in flows if (f.get("IP") or {}).get("source") == x1
                      and f["l7"].get("type") == "REQUEST" and f["verdict"] == "DROPPED"
                      and (f["l7"].get("http") or {}).get("url") == private]
            if denied or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert denied, flows[-3:]
        assert denied[-1]["source"].get("pod_name") == "x1", denied[-1]["source"]
        assert denied[-1]["source"]["identity"] >> 16 == 1, denied[-1]["source"]
    finally:
        lab.ok("--cluster", "c2", "delete", "-f", str(path))
