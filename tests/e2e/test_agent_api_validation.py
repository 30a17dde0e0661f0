"""Issue 11 §2 end-to-end: the agent API validates before it acts, survives bad state,
and its metrics ports and API socket cannot be exhausted by one client."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from villi._nsenter import in_netns
from villi.netns import create_netns, delete_netns
from villi.testing.agent import AgentProcess

pytestmark = pytest.mark.e2e

METRICS_PORT = 19962


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    extra = ("--metrics-port", str(METRICS_PORT))
    with AgentProcess(pod_cidr="10.68.0.0/28", extra_args=extra) as ag:
        # AgentProcess passes --metrics-port 0 first; the later flag wins.
        yield ag


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"villi-v{uuid.uuid4().hex[:6]}"
    create_netns(name)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        delete_netns(name)


def raw(agent: AgentProcess, method: str, path: str, body: object) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                      base_url="http://villi", timeout=10) as c:
        return c.request(method, path, content=json.dumps(body))


def allocated(agent: AgentProcess) -> int:
    with agent.client() as c:
        return int(c.get("/v1/healthz")["ipam"]["allocated"])


BAD_CREATES = [
    ("body is a list", [], "body"),
    ("body is null", None, "body"),
    ("containerID is a number", {"containerID": 5}, "containerID"),
    ("labels is a list", {"labels": ["a"]}, "labels"),
    ("labels is null-ish list", {"labels": []}, "labels"),
    ("bad label key", {"labels": {"bad key!": "x"}}, "labels['bad key!']"),
    ("label value integer", {"labels": {"app": 3}}, "labels['app']"),
    ("namespace with ;", {"namespace": "a;b"}, "namespace"),
    ("namespace list", {"namespace": ["x"]}, "namespace"),
    ("named port bad", {"namedPorts": {"http": {"port": "x"}}}, "namedPorts['http'].port"),
]


@pytest.mark.parametrize("name,patch,field", BAD_CREATES, ids=[b[0] for b in BAD_CREATES])
def test_bad_create_is_400_naming_field_and_allocates_nothing(
        agent: AgentProcess, netns: str, name: str, patch: object, field: str) -> None:
    before = allocated(agent)
    if isinstance(patch, dict):
        body: object = {"containerID": f"c{uuid.uuid4().hex[:8]}", "netns": netns,
                        "ifname": "eth0", **patch}
    else:
        body = patch
    resp = raw(agent, "POST", "/v1/endpoint", body)
    assert resp.status_code == 400, resp.text
    assert field in resp.json()["error"], resp.json()
    assert allocated(agent) == before
    with agent.client() as c:
        assert c.get("/v1/endpoint") == []


def test_patch_bad_labels_is_400_and_labels_unchanged(
        agent: AgentProcess, netns: str) -> None:
    cid = f"c{uuid.uuid4().hex[:8]}"
    resp = raw(agent, "POST", "/v1/endpoint", {"containerID": cid, "netns": netns,
                                               "ifname": "eth0", "podName": "p1",
                                               "labels": {"app": "one"}})
    assert resp.status_code == 201, resp.text
    ref = f"/v1/endpoint/container-id:{cid}"
    try:
        for bad in ({"labels": {"a;b": "x"}}, {"labels": {"app": 1}}, {"labels": []}, []):
            resp = raw(agent, "PATCH", ref, bad)
            assert resp.status_code == 400, resp.text
            assert "labels" in resp.json()["error"]
        with agent.client() as c:
            assert c.get(ref)["labels"]["app"] == "one"
    finally:
        raw(agent, "DELETE", ref, None)


def test_unreadable_endpoint_record_is_quarantined(tmp_path: Path) -> None:
    with AgentProcess(pod_cidr="10.68.1.0/28") as ag:
        ns = f"villi-v{uuid.uuid4().hex[:6]}"
        create_netns(ns)
        try:
            cid = f"c{uuid.uuid4().hex[:8]}"
            resp = raw(ag, "POST", "/v1/endpoint", {"containerID": cid,
                                                    "netns": f"/var/run/netns/{ns}",
                                                    "ifname": "eth0", "podName": "good"})
            assert resp.status_code == 201, resp.text
            ag.stop()
            records = ag.state_dir / "endpoints"
            (records / "9999.json").write_text('{"id": 9999, "labels": {"a;b": 1}')
            (records / "9998.json").write_text(json.dumps({"id": 9998, "labels": {"x": 3}}))
            ag.start()
            with ag.client() as c:
                eps = c.get("/v1/endpoint")
            assert [e["podName"] for e in eps] == ["good"]
            moved = sorted(p.name for p in (ag.state_dir / "quarantine").iterdir())
            assert len(moved) == 2 and moved[0].startswith("9998.json")
            assert "unreadable" in ag.log() and "quarantine" in ag.log()
            raw(ag, "DELETE", f"/v1/endpoint/container-id:{cid}", None)
        finally:
            delete_netns(ns)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _scrape(agent: AgentProcess) -> bytes:
    with in_netns(agent.netns):
        s = socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=5)
    with s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_metrics_port_bounds_idle_connections(agent: AgentProcess) -> None:
    assert agent.proc is not None
    assert b"200 OK" in _scrape(agent)
    base = _threads(agent.proc.pid)
    idle = []
    with in_netns(agent.netns):
        for _ in range(200):
            try:
                idle.append(socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=2))
            except OSError:
                break
    try:
        time.sleep(1)
        assert _threads(agent.proc.pid) <= base + 2  # no thread per connection
        # Idle connections are closed by the agent within its idle timeout.
        time.sleep(6)
        closed = 0
        for s in idle:
            s.settimeout(0.5)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except OSError:
                closed += 1
        assert closed == len(idle)
        assert b"200 OK" in _scrape(agent)
    finally:
        for s in idle:
            s.close()


def test_api_socket_holds_a_burst_of_500(agent: AgentProcess) -> None:
    def connect(_: int) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        try:
            s.connect(str(agent.socket))
            s.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
        finally:
            s.close()

    with ThreadPoolExecutor(max_workers=500) as pool:
        results = list(pool.map(connect, range(500)))
    assert all(results), f"{results.count(False)} of 500 refused"
