"""Issue 11 §1–§3 in a real lab: etcd needs client certificates, pods cannot reach
it (nor node addresses) unless a policy allows it, and a pod add that fails leaves
no pod behind. One 2-node lab for the module, with its own state file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e._lab import Lab, running_lab
from villi._nsenter import in_netns
from villi.errors import StoreError
from villi.kvstore import EtcdStore
from villi.kvstore.tls import KvstoreTLS

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]



@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "seclab", "--nodes", "2") as lab:
        lab.ok("lab", "pod", "add", "sec/a", "--node", "1", "--labels", "app=a")
        lab.ok("lab", "pod", "add", "sec/b", "--node", "2", "--labels", "app=b",
               "--serve", "80/tcp")
        yield lab


def tcp_connects(netns: str, host: str, port: int, timeout: float = 1.5) -> bool:
    """A TCP handshake from inside ``netns`` (no payload: etcd would drop a probe's)."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            return True
        except OSError:
            return False


def _etcd_read(url: str, tls: KvstoreTLS | None) -> str:
    async def go() -> str:
        async with EtcdStore(url, tls=tls, connect_timeout=1, request_timeout=2) as store:
            await store.put("villi/state/evil", b"x")
            return str(await store.list("villi/"))
    return asyncio.run(go())


def test_lab_etcd_requires_a_client_certificate(lab: Lab) -> None:
    state = lab.state
    assert state["kvstore"].startswith("https://")
    tls = KvstoreTLS.from_dict(state["kvstore_tls"])
    assert tls is not None and tls.cert
    # The CLI finds the certificates through the lab state, transparently.
    assert json.loads(lab.ok("get", "nodes", "-o", "json"))
    with in_netns(state["kvstore_netns"]):
        with pytest.raises(StoreError, match="certificate"):
            _etcd_read(state["kvstore"], KvstoreTLS(ca=tls.ca))
        assert "villi/state/nodes" in _etcd_read(state["kvstore"], tls)


def test_pod_cannot_reach_etcd_even_with_the_certificates(lab: Lab) -> None:
    state = lab.state
    tls = KvstoreTLS.from_dict(state["kvstore_tls"])
    pod = state["pods"]["sec/a"]
    gw = state["underlay"]["gateway"]
    assert not tcp_connects(pod["netns"], gw, 2379)
    with in_netns(pod["netns"]):
        with pytest.raises(StoreError):
            _etcd_read(state["kvstore"], tls)  # stopped by the datapath, not by TLS
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://{gw}:2379/v3/kv/range", json={"key": "dmlsbGk="},
                       timeout=2)
    # Node addresses are guarded too (agent metrics and API live there).
    node2 = state["nodes"][1]["ip"]
    assert not tcp_connects(pod["netns"], node2, 9962)
    # ...while pod-to-pod traffic across nodes still works.
    assert lab.probe("sec/a", "sec/b", "80")
    flows = lab.run("observe", "-o", "json", "--last", "2000")
    assert "CONTROL_PLANE_DENIED" in flows.stdout or "Control plane" in flows.stdout, \
        flows.stdout[-2000:] + flows.stderr


def test_policy_can_open_the_kvstore_explicitly(lab: Lab, tmp_path: Path) -> None:
    gw = lab.state["underlay"]["gateway"]
    policy = tmp_path / "allow-kvstore.yaml"
    policy.write_text(textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a-to-kvstore, namespace: sec}
        spec:
          endpointSelector: {matchLabels: {app: a}}
          egress:
          - toEntities: [kube-apiserver]
          - toEndpoints: [{matchLabels: {app: b}}]
        """))
    lab.ok("apply", "-f", str(policy))
    try:
        deadline = time.monotonic() + 15
        netns = lab.state["pods"]["sec/a"]["netns"]
        while not tcp_connects(netns, gw, 2379):
            if time.monotonic() > deadline:
                flows = lab.run("observe", "-o", "json", "--last", "50").stdout
                policy_view = lab.run("get", "policies").stdout
                pytest.fail(f"policy did not open the kvstore:\n{policy_view}\n{flows}")
        assert lab.probe("sec/a", "sec/b", "80")
    finally:
        lab.ok("delete", "-f", str(policy))


def test_frozen_kvstore_fails_apply_and_pod_add_fast_and_cleanly(lab: Lab,
                                                                tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: frozen, namespace: sec}
        spec:
          endpointSelector: {matchLabels: {app: zzz}}
          ingress: [{fromEndpoints: [{matchLabels: {app: yyy}}]}]
        """))
    etcd = lab.state["processes"]["etcd"]["pid"]
    pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(etcd)], capture_output=True,
                                           text=True).stdout.split()] + [etcd]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        res = lab.run("apply", "-f", str(policy))
        took = time.monotonic() - t0
        assert res.returncode == 1 and "nothing was applied" in res.stderr, res.stderr
        assert "kvstore" in res.stderr and took < 5.0, (took, res.stderr)
        t0 = time.monotonic()
        res = lab.run("lab", "pod", "add", "sec/frozen", "--node", "1",
                      "--labels", "app=never-seen-before")
        took = time.monotonic() - t0
        assert res.returncode != 0, res.stdout
        assert took < 5.0, (took, res.stderr)
        assert "kvstore" in res.stderr and "DEL" not in res.stderr, res.stderr
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert "sec/frozen" not in lab.state["pods"]
    time.sleep(1)
    assert "frozen" not in lab.ok("get", "policies")
