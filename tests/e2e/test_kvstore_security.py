"""Issue 11 §1 and §3 end-to-end against a real etcd: client certificates are
required, and ``villi apply`` is one transaction (all or nothing, fast failure)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest

from villi.errors import StoreError
from villi.kvstore import EtcdStore
from villi.kvstore.tls import KvstoreTLS
from villi.resources import RESOURCES
from villi.testing.etcd import EtcdServer, etcd_available
from villi.testing.kvstore import take

pytestmark = [pytest.mark.e2e, pytest.mark.etcd,
              pytest.mark.skipif(not etcd_available(), reason="needs /usr/bin/etcd")]

POLICY = """---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p{i}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a{i}}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: b{i}}}}}]}}]
"""


def policies(path: Path, count: int) -> Path:
    path.write_text("".join(POLICY.format(i=i) for i in range(count)))
    return path


def villi(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VILLI_")}
    full_env["VILLI_LAB_STATE"] = "/nonexistent/villi-test-lab-state.json"
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "villi.cli.main", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=stdin)


def count(server: EtcdServer, tls: KvstoreTLS | None = None) -> int:
    async def go() -> int:
        async with EtcdStore(server.endpoint, tls=tls) as store:
            return len((await store.list(RESOURCES)).items)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[EtcdServer]:
    with EtcdServer(tls=True) as server:
        yield server


# --- §1: etcd only talks to holders of a client certificate ---------------------------


def test_component_with_certificate_works(tls_etcd: EtcdServer) -> None:
    async def go() -> bytes | None:
        async with EtcdStore(tls_etcd.endpoint, tls=tls_etcd.client_tls) as store:
            await store.put("t/secure", b"yes")
            kv = await store.get("t/secure")
            return kv.value if kv else None
    assert asyncio.run(go()) == b"yes"


def test_component_without_certificate_is_refused(tls_etcd: EtcdServer) -> None:
    assert tls_etcd.client_tls is not None
    only_ca = KvstoreTLS(ca=tls_etcd.client_tls.ca)

    async def go() -> None:
        async with EtcdStore(tls_etcd.endpoint, tls=only_ca, connect_timeout=1,
                             request_timeout=2) as store:
            await store.put("t/evil", b"x")
    with pytest.raises(StoreError, match="TLS|certificate|unreachable"):
        asyncio.run(go())
    # Plain HTTP to the client port gets no data either.
    plain = tls_etcd.endpoint.replace("https://", "http://")
    try:
        resp = httpx.post(plain + "/v3/kv/range", json={"key": "dC9zZWN1cmU="}, timeout=3)
        assert "kvs" not in resp.text
    except httpx.HTTPError:
        pass
    # The CLI without certificates fails; with the flags it works.
    bad = villi("--kvstore", tls_etcd.endpoint, "get", "policies", timeout=60)
    assert bad.returncode != 0


def test_cli_flags_give_the_certificate(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    tls = tls_etcd.client_tls
    assert tls is not None and tls.ca and tls.cert and tls.key
    flags = ["--kvstore", tls_etcd.endpoint, "--kvstore-ca", tls.ca,
             "--kvstore-cert", tls.cert, "--kvstore-key", tls.key]
    got = villi(*flags, "apply", "-f", str(policies(tmp_path / "p.yaml", 2)))
    assert got.returncode == 0, got.stderr
    assert "created" in got.stdout
    # Same through the environment (what a lab gives its agents and operator).
    got = villi("--kvstore", tls_etcd.endpoint, "apply", "-f", "-",
                env=tls.as_env(), stdin=POLICY.format(i=7))
    assert got.returncode == 0, got.stderr
    assert count(tls_etcd, tls) >= 3


# --- §3: one apply = one transaction --------------------------------------------------


def test_apply_is_one_revision_for_watchers(tmp_path: Path) -> None:
    with EtcdServer(extra_args=("--max-txn-ops", "1000")) as server:
        async def go() -> set[int]:
            async with EtcdStore(server.endpoint) as store:
                start = await store.revision()
                async with aclosing(store.watch(RESOURCES, start + 1)) as events:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "villi.cli.main", "--kvstore", server.endpoint,
                        "apply", "-f", str(policies(tmp_path / "p.yaml", 300)),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                    seen = await take(events, 300, timeout=60)
                    _, err = await proc.communicate()
                    assert proc.returncode == 0, err
                return {e.revision for e in seen}
        assert len(asyncio.run(go())) == 1


def test_apply_refused_by_etcd_limits_applies_nothing(tmp_path: Path) -> None:
    with EtcdServer(extra_args=("--max-txn-ops", "16")) as server:
        got = villi("--kvstore", server.endpoint, "apply", "-f",
                    str(policies(tmp_path / "p.yaml", 40)))
        assert got.returncode == 1
        assert "nothing was applied" in got.stderr and "max-txn-ops" in got.stderr
        assert count(server) == 0


def test_interrupted_apply_is_all_or_nothing(tmp_path: Path) -> None:
    path = policies(tmp_path / "p.yaml", 400)
    with EtcdServer(extra_args=("--max-txn-ops", "1000")) as server:
        outcomes = set()
        before = 0
        for delay in (0.3, 0.8, 1.2, 1.6, 2.2, 3.0):
            env = {k: v for k, v in os.environ.items() if not k.startswith("VILLI_")}
            env["VILLI_LAB_STATE"] = "/nonexistent/state.json"
            proc = subprocess.Popen(
                [sys.executable, "-m", "villi.cli.main", "--kvstore", server.endpoint,
                 "delete" if delay in (1.6,) else "apply", "-f", str(path)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            n = count(server)
            assert n in (0, 400), f"interrupt after {delay}s left {n} of 400 applied"
            if "nothing was applied" in err:  # when it is said, it must be true
                assert n == before, (delay, err)
            before = n
            outcomes.add(n)


def test_frozen_kvstore_fails_fast_and_applies_nothing(tmp_path: Path) -> None:
    with EtcdServer() as server:
        assert server._proc is not None
        path = policies(tmp_path / "p.yaml", 5)
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            got = villi("--kvstore", server.endpoint, "apply", "-f", str(path))
            elapsed = time.monotonic() - start
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
        assert got.returncode == 1
        assert elapsed < 5.0, elapsed  # the interpreter's start-up included
        assert "kvstore" in got.stderr and server.endpoint in got.stderr
        assert "nothing was applied" in got.stderr
        time.sleep(1)  # whatever etcd had queued is processed now
        assert count(server) == 0
