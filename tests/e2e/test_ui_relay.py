"""Issue 18 end-to-end: a 2-node lab with pods in two namespaces; flows read through the
relay (CLI, Hubble gRPC client), the agents' authenticated TCP flow endpoint, a node
that does not answer, and the web UI in headless Chromium (map, dropped arrow,
explanation with the policy's YAML, screenshots)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import _browser, _lab
from tests.e2e._lab import running_lab

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

VILLI = [sys.executable, "-m", "villi.cli.main"]
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-from-frontend
  namespace: shop
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend, k8s:io.kubernetes.pod.namespace: shop}
    toPorts:
    - ports:
      - {port: "80", protocol: TCP}
"""


class Lab(_lab.Lab):
    """The lab driver plus the relay flow query."""

    def relay_flows(self, *args: str) -> tuple[list[dict], str]:
        res = self.run("observe", "--server", self.state["relay"]["http"], "-o", "json",
                       "--last", "1000", *args)
        assert res.returncode == 0, res.stderr
        return [json.loads(line)["flow"] for line in res.stdout.splitlines()], res.stderr


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "uilab", "--nodes", "2", lab_class=Lab) as lab:
        assert isinstance(lab, Lab)
        assert "Flows: http://127.0.0.1:" in lab.up_output
        lab.ok("lab", "pod", "add", "shop/web", "--node", "1", "--labels", "app=web",
               "--serve", "80/tcp")
        lab.ok("lab", "pod", "add", "shop/frontend", "--node", "2", "--labels", "app=frontend")
        lab.ok("lab", "pod", "add", "tools/intruder", "--node", "2", "--labels", "app=intruder")
        (lab.tmp / "policy.yaml").write_text(textwrap.dedent(POLICY))
        lab.ok("apply", "-f", str(lab.tmp / "policy.yaml"))
        deadline = time.monotonic() + 10
        while lab.run("lab", "probe", "tools/intruder", "shop/web", "80/tcp",
                      "--timeout", "0.5").returncode == 0:
            assert time.monotonic() < deadline, "the policy never took effect"
        assert lab.run("lab", "probe", "shop/frontend", "shop/web", "80/tcp").returncode == 0
        yield lab


def test_relay_merges_the_flows_of_both_nodes(lab: Lab) -> None:
    flows, err = lab.relay_flows("--to-pod", "shop/web", "--to-port", "80")
    nodes = {f["node_name"] for f in flows}
    assert nodes == {"node1", "node2"}, (nodes, err)
    times = [f["time"] for f in flows]
    assert times == sorted(times)
    dropped = [f for f in flows if f["verdict"] == "DROPPED"]
    assert dropped and all(f["source"]["pod_name"] == "intruder" for f in dropped)
    assert "did not answer" not in err


def test_ui_api_time_range_and_namespace_map(lab: Lab) -> None:
    import httpx

    url = lab.state["ui_url"]
    since = time.time() - 3600
    got = httpx.get(f"{url}api/flows", params={"since": str(since), "verdict": "DROPPED"},
                    timeout=20).json()
    assert got["flows"] and not got["node_status"]
    assert all(f["verdict"] == "DROPPED" for f in got["flows"])
    view = httpx.get(f"{url}api/map", params={"map_namespace": "tools"}, timeout=20).json()
    assert [a["id"] for a in view["arrows"]] == ["tools/intruder->shop/web:80/TCP"]
    bad = httpx.get(f"{url}api/flows", params={"since": "yesterday"}, timeout=20)
    assert bad.status_code == 400


def test_follow_through_the_relay_streams_new_flows(lab: Lab) -> None:
    import selectors

    proc = subprocess.Popen([*VILLI, "observe", "--server", lab.state["relay"]["http"], "-f",
                             "--from-pod", "tools/intruder", "-o", "json"], env=lab.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)   # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        got: list[dict] = []
        next_probe = 0.0
        # The relay opens its follow streams to both nodes concurrently and a busy
        # machine may take a while: probe again until the drop streams through.
        while time.monotonic() < deadline and not any(f["verdict"] == "DROPPED" for f in got):
            if time.monotonic() >= next_probe:
                assert lab.run("lab", "probe", "tools/intruder", "shop/web", "80/tcp",
                               "--timeout", "0.5").returncode != 0
                next_probe = time.monotonic() + 2.0
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()   # type: ignore[union-attr]
                if line.strip():
                    got.append(json.loads(line)["flow"])
        assert any(f["verdict"] == "DROPPED" and f["destination"]["pod_name"] == "web"
                   for f in got), got
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_agent_flow_endpoint_needs_the_token(lab: Lab) -> None:
    import httpx

    from villi._nsenter import in_netns

    node = lab.state["nodes"][0]
    token = (Path(lab.state["dir"]) / "flows.token").read_text().strip()
    url = f"http://{node['ip']}:4244/v1/flows/status"
    with in_netns(lab.state["underlay"]["netns"]):
        assert httpx.get(url, timeout=5).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong-token-wrong"},
                         timeout=5).status_code == 401
        ok = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["node"] == node["name"]


def test_relay_names_nodes_that_do_not_answer(lab: Lab) -> None:
    """A second relay with one real peer and one that refuses: flows of the first, and
    the second reported (CLI stderr and status), not silently missing."""
    st = lab.state
    sock = Path(st["dir"]) / "relay2.sock"
    n1 = st["nodes"][0]
    proc = subprocess.Popen(
        [*VILLI, "--netns", st["underlay"]["netns"], "relay", "--token-file",
         str(Path(st["dir"]) / "flows.token"), "--listen", f"unix://{sock}",
         "--peer", f"node1={n1['ip']}:4244", "--peer", f"ghost={st['underlay']['gateway']}:1",
         "--dial-timeout", "2"], env=lab.env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        res = lab.run("observe", "--server", f"unix://{sock}", "-o", "json", "--last", "50")
        assert res.returncode == 0, res.stderr
        flows = [json.loads(line)["flow"] for line in res.stdout.splitlines()]
        assert flows and {f["node_name"] for f in flows} == {"node1"}
        assert "ghost" in res.stderr and "did not answer" in res.stderr
        status = json.loads(lab.ok("observe", "status", "--server", f"unix://{sock}"))
        assert status["unavailable_nodes"] == ["ghost"]
        assert status["num_connected_nodes"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_hubble_grpc_client_reads_flows_with_filters(lab: Lab) -> None:
    import grpc

    from villi.relay.proto import flow_pb2, observer_pb2, observer_pb2_grpc, relay_pb2

    with grpc.insecure_channel(lab.state["relay"]["grpc"]) as ch:
        stub = observer_pb2_grpc.ObserverStub(ch)
        status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        assert status.num_connected_nodes.value == 2 and status.seen_flows > 0
        nodes = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
        assert {(n.name, n.state) for n in nodes} == {("node1", relay_pb2.NODE_CONNECTED),
                                                       ("node2", relay_pb2.NODE_CONNECTED)}
        req = observer_pb2.GetFlowsRequest(number=100, whitelist=[flow_pb2.FlowFilter(
            verdict=[flow_pb2.DROPPED], destination_pod=["shop/web"])])
        flows = [r.flow for r in stub.GetFlows(req, timeout=10) if r.HasField("flow")]
        assert flows
        for f in flows:
            assert f.verdict == flow_pb2.DROPPED
            assert f.drop_reason_desc == flow_pb2.POLICY_DENIED
            assert (f.source.namespace, f.source.pod_name) == ("tools", "intruder")
            assert f.destination.pod_name == "web" and f.l4.TCP.destination_port == 80
            assert f.node_name == "node1" and f.time.seconds > 0 and f.uuid
        # blacklist: everything from shop/frontend except what goes to port 80
        req = observer_pb2.GetFlowsRequest(
            number=100, whitelist=[flow_pb2.FlowFilter(source_pod=["shop/frontend"])],
            blacklist=[flow_pb2.FlowFilter(destination_port=["80"])])
        flows = [r.flow for r in stub.GetFlows(req, timeout=10) if r.HasField("flow")]
        assert all(f.source.pod_name == "frontend" and f.l4.TCP.destination_port != 80
                   for f in flows)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GetFlows(observer_pb2.GetFlowsRequest(whitelist=[
                flow_pb2.FlowFilter(dns_query=["x"])]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dns_query" in e.value.details()


def test_dashboards_query_only_metrics_the_agents_export(lab: Lab) -> None:
    """Scrape both ports of a real agent (and the lab's scrape config names them); every
    series the Grafana dashboards query is exported."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.unit.test_relay_ui_units import _base, dashboard_metric_names
    from villi._nsenter import in_netns

    st = lab.state
    node = st["nodes"][0]
    scrape = (Path(st["dir"]) / "prometheus.yml").read_text()
    assert f"{node['ip']}:9962" in scrape and f"{node['ip']}:9965" in scrape
    exported: set[str] = set()
    with in_netns(st["underlay"]["netns"]):
        for port in (9962, 9965):
            text = httpx.get(f"http://{node['ip']}:{port}/metrics", timeout=5).text
            exported |= {f.name for f in text_string_to_metric_families(text)}
    names = dashboard_metric_names()
    assert len(names) > 15
    missing = sorted(n for n in names if n not in exported and _base(n) not in exported)
    assert not missing, missing
    for name in ("cilium_drop_count", "cilium_forward_count", "cilium_endpoint_regenerations",
                 "cilium_policy_l7", "cilium_bpf_map_pressure",
                 "cilium_kvstore_operations_duration_seconds", "hubble_flows_to_world"):
        assert name in exported, name
    with in_netns(st["underlay"]["netns"]):
        text = httpx.get(f"http://{node['ip']}:9962/metrics", timeout=5).text
    drops = [line for line in text.splitlines()
             if line.startswith("cilium_drop_count_total{")]
    assert any('reason="Policy denied"' in line and 'direction="INGRESS"' in line
               for line in drops), drops


def _wait(driver, script: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def test_ui_in_chromium_shows_map_verdicts_and_explanations(lab: Lab) -> None:
    why = _browser.available()
    if why:
        pytest.fail(f"browser test cannot run: {why}")
    from selenium.webdriver.common.by import By

    shots = Path(tempfile.mkdtemp(prefix="villi-ui-screenshots-"))
    print(f"screenshots in {shots}")
    with _browser.chromium() as d:
        d.get(lab.state["ui_url"])
        _wait(d, "return document.body.dataset.loaded")
        cards = _wait(d, "return window.villiMap && window.villiMap.nodes().length > 3 && "
                         "window.villiMap.nodes().map(n => n.id())")
        assert {"shop/web", "shop/frontend", "tools/intruder", "ns:shop", "ns:tools"} <= \
            set(cards)
        edges = dict(d.execute_script(
            "return window.villiMap.edges().map(e => [e.id(), e.data('verdict')])"))
        assert edges["tools/intruder->shop/web:80/TCP"] == "dropped"
        assert edges["shop/frontend->shop/web:80/TCP"] == "forwarded"
        d.save_screenshot(str(shots / "map.png"))

        d.find_element(By.CSS_SELECTOR, '#arrows tr[data-arrow="tools/intruder->shop/web:80/TCP"]'
                       ).click()
        _wait(d, "return !document.getElementById('explain').hidden")
        text = d.find_element(By.ID, "explain-text").text
        assert "default deny" in text
        assert d.find_element(By.CSS_SELECTOR, 'dd[data-fact="policy"]').text == "default deny"
        d.save_screenshot(str(shots / "explain-dropped.png"))

        d.find_element(By.CSS_SELECTOR, '#arrows tr[data-arrow="shop/frontend->shop/web:80/TCP"]'
                       ).click()
        _wait(d, "return document.getElementById('explain-yaml').textContent")
        policy = d.find_element(By.CSS_SELECTOR, 'dd[data-fact="policy"]').text
        assert "shop/web-from-frontend" in policy
        assert "name: web-from-frontend" in d.find_element(By.ID, "explain-yaml").text
        d.save_screenshot(str(shots / "explain-allowed.png"))

        # one namespace on request; the flows table with a verdict filter
        d.execute_script("const s = document.getElementById('namespace');"
                         "s.value = 'tools'; s.dispatchEvent(new Event('change'));")
        _wait(d, "return window.villiMap.edges().length === 1")
        d.execute_script("const s = document.getElementById('verdict');"
                         "s.value = 'DROPPED'; s.dispatchEvent(new Event('change'));")
        _wait(d, "const rows = [...document.querySelectorAll('#flows tbody tr')];"
                 "return rows.length > 0 && rows.every(r => r.dataset.verdict === 'DROPPED')")
        d.find_element(By.CSS_SELECTOR, "#flows tbody tr").click()
        _wait(d, "return /default deny/.test("
                 "document.getElementById('explain-text').textContent)")
        d.save_screenshot(str(shots / "flows-dropped.png"))
    assert all((shots / n).stat().st_size > 10_000 for n in
               ("map.png", "explain-dropped.png", "explain-allowed.png", "flows-dropped.png"))
