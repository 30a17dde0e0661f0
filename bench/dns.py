#!/usr/bin/env python3
"""DNS proxy benchmark (issue 13): added latency, answer-to-allow time, CPU per query.

Same run, same machine, real sockets on loopback:

1. baseline: a paced client (``--rate`` queries/s, default 1,000) asks a real dnsmasq
   directly; per-query latency p50/p99;
2. proxied: the same client asks the DNS proxy (``villi.dnsproxy``), which checks the
   endpoint's DNS rules, forwards to dnsmasq, learns the answer and holds it until the
   learned-IP hook is done; the hook is the real policy path in-process (name manager →
   ``PolicyResolver.learn_fqdn`` over a policy with toFQDNs selectors and 100 local
   endpoints), without the kernel map writes (a lab measurement adds them);
3. answer-to-allow: from the answer arriving at the proxy to the hook completing
   (p50/p99; goal ≤ 10 ms, Cilium's budget is the 100 ms hold);
4. proxy CPU per query: CPU time of the proxy's event-loop thread / queries;
5. steered (``--no-lab`` skips it): a 1-node lab, the same paced client inside a pod
   asking the lab DNS server — first with no policy (straight to dnsmasq), then with a
   rules.dns + toFQDNs policy, so the datapath steers every query (bpf_sk_assign) to the
   DNS proxy in the node's villi-proxy; and names never asked before, one at a time,
   whose answers wait for the agent's identity, ipcache and policy-map writes (their
   extra latency over known names estimates answer-to-allow with the kernel writes).

Names cycle over ``--names`` records, a third of them new per round, so the hook does real
work (new IPs) as well as no-op updates (known IPs).

    .venv/bin/python bench/dns.py --quick     # 2 s per phase
    .venv/bin/python bench/dns.py             # 10 s per phase

Writes JSON to ``bench/results/dns.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dnslib import DNSRecord  # noqa: E402

from villi.dnsproxy.cache import CacheStore  # noqa: E402
from villi.dnsproxy.names import NameManager  # noqa: E402
from villi.dnsproxy.proxy import DNSProxy, ProxyConfig  # noqa: E402
from villi.lab import dnsserver  # noqa: E402
from villi.policy.fqdn import DNSRuleSet  # noqa: E402
from villi.policy.simulate import PolicySimulator  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paced_client(port: int, names: list[str], rate: float, seconds: float,
                 host: str = "127.0.0.1") -> list[float]:
    """Send one query per 1/rate s, wait for its answer; latencies in ms."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    out = []
    n = int(rate * seconds)
    t_next = time.perf_counter()
    for i in range(n):
        q = DNSRecord.question(names[i % len(names)])
        t0 = time.perf_counter()
        s.sendto(q.pack(), (host, port))
        try:
            while True:
                data, _ = s.recvfrom(4096)
                if DNSRecord.parse(data).header.id == q.header.id:
                    break
            out.append((time.perf_counter() - t0) * 1000)
        except TimeoutError:
            pass
        t_next += 1 / rate
        delay = t_next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    s.close()
    return out


def steered_phase(rate: float, seconds: float, known: int = 60,
                  fresh: int = 100) -> dict[str, Any]:
    """The lab part: direct vs steered latency from a pod, and first-lookup latency."""
    tmp = Path(tempfile.mkdtemp(prefix="villi-bench-dns-lab-"))
    env = {**os.environ, "VILLI_LAB_STATE": str(tmp / "state.json"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    villi = [sys.executable, "-m", "villi.cli.main"]

    def run(*args: str) -> str:
        res = subprocess.run([*villi, *args], env=env, capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"villi {' '.join(args)}: {res.stderr.strip()[-500:]}")
        return res.stdout

    os.environ["VILLI_LAB_STATE"] = env["VILLI_LAB_STATE"]   # villi.lab in-process too
    from villi._nsenter import in_netns
    from villi.lab import _state, world

    try:
        run("lab", "up", "--nodes", "1", "--kvstore", "embedded")
        run("lab", "pod", "add", "default/client", "--labels", "app=client")
        names = [f"k{i}.example.com" for i in range(known)]
        new = [f"n{i}.example.com" for i in range(fresh)]
        state = _state.require()
        files = dnsserver.RecordFile(Path(state["dns"]["dir"]))
        records = files.load()
        for i, name in enumerate(names + new):
            records[name] = {"name": name, "type": "A", "ttl": 300,
                             "ip": f"203.0.113.{i % 250 + 1}" if i < 250 else
                             f"198.51.100.{i % 250 + 1}"}
        files.save(records)
        world.dns_add("k0.example.com", records["k0.example.com"]["ip"], 300)   # restart
        netns = state["pods"]["default/client"]["netns"]
        server = world.DNS_IP

        def client(qnames: list[str], qps: float, secs: float) -> list[float]:
            with in_netns(netns):
                return paced_client(53, qnames, qps, secs, host=server)

        client(names[:5], 50, 0.2)
        direct = client(names, rate, seconds)
        policy = tmp / "fqdn.yaml"
        policy.write_text(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: ["{server}/32"]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.example.com"}}]
  - toFQDNs: [{{matchPattern: "k*.example.com"}}, {{matchPattern: "n*.example.com"}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
""")
        run("apply", "-f", str(policy))
        deadline = time.monotonic() + 30
        while "k0.example.com" not in run("get", "fqdn-cache"):   # steered now
            if time.monotonic() > deadline:
                raise RuntimeError("the DNS proxy did not start answering")
            client(["k0.example.com"], 10, 0.1)
        client(names, 50, 1.0)   # every known name learned once
        steered = client(names, rate, seconds)
        first = client(new, 20, fresh / 20)   # one new name every 50 ms
        with in_netns(state["nodes"][0]["netns"]):
            agent = urllib.request.urlopen("http://127.0.0.1:9962/metrics",
                                           timeout=5).read().decode()
        stats = {line.split()[0].replace("villi_proxy_dns_", "").replace("_total", ""):
                 float(line.split()[1]) for line in agent.splitlines()
                 if line.startswith("villi_proxy_dns_")}
        known_p50 = pct(steered, 50)
        return {
            "direct_ms": {"p50": pct(direct, 50), "p99": pct(direct, 99), "n": len(direct)},
            "steered_ms": {"p50": known_p50, "p99": pct(steered, 99), "n": len(steered)},
            "added_ms": {"p50": known_p50 - pct(direct, 50),
                         "p99": pct(steered, 99) - pct(direct, 99)},
            "first_lookup_ms": {"p50": pct(first, 50), "p99": pct(first, 99),
                                "n": len(first)},
            "answer_to_allow_ms_estimate": {"p50": pct(first, 50) - known_p50,
                                            "p99": pct(first, 99) - known_p50,
                                            "note": "first-lookup latency minus known-name "
                                            "p50: proxy → agent → identity, ipcache and "
                                            "policy map writes → snapshot to villi-proxy"},
            "proxy_stats": stats,
        }
    finally:
        subprocess.run([*villi, "lab", "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def resolver_with_endpoints(n: int) -> PolicySimulator:
    sim = PolicySimulator()
    for i in range(n):
        sim.add_pod(f"prod/client-{i}", {"app": "client"}, f"10.64.0.{i + 1}")
    sim.apply_yaml("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fq, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchPattern: "*.example.com"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""")
    return sim


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--names", type=int, default=300)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--no-lab", action="store_true", help="skip the steered lab phase")
    args = ap.parse_args()
    seconds = 2.0 if args.quick else 10.0
    if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
        print("dnsmasq is missing (apt-get install dnsmasq-base)", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="villi-bench-dns-"))
    records = {f"h{i}.example.com": {"name": f"h{i}.example.com",
                                     "ip": f"198.51.{100 + i // 250}.{i % 250 + 1}",
                                     "ttl": 30} for i in range(args.names)}
    files = dnsserver.RecordFile(tmp)
    files.save(records)
    up_port = free_port()
    dnsmasq = subprocess.Popen(dnsserver.command(files.conf, "127.0.0.1", up_port,
                                                 log_queries=False),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = list(records)
    try:
        time.sleep(0.3)
        paced_client(up_port, names[:5], 50, 0.1)   # warm up
        direct = paced_client(up_port, names, args.rate, seconds)

        sim = resolver_with_endpoints(args.endpoints)
        allow_ms: list[float] = []

        async def apply(changed: dict, removed: list) -> None:
            sim.resolver.learn_fqdn(changed, removed)

        names_mgr = NameManager(apply, ["*.example.com"])

        async def learned(ep: str, name: str, ips: list[str]) -> None:
            t0 = time.perf_counter()
            await names_mgr.learned(name, ips)
            allow_ms.append((time.perf_counter() - t0) * 1000)

        proxy = DNSProxy(CacheStore(tmp / "cache.json"),
                         config=ProxyConfig(upstream=lambda d: ("127.0.0.1", up_port)),
                         on_learned=learned)
        proxy.set_rules("127.0.0.1", DNSRuleSet(("*.example.com.",)))
        loop = asyncio.new_event_loop()
        started = threading.Event()
        box: dict = {}

        def run_loop() -> None:
            asyncio.set_event_loop(loop)
            box["addr"] = loop.run_until_complete(proxy.start("127.0.0.1", 0))
            box["clock"] = time.pthread_getcpuclockid(threading.get_ident())
            started.set()
            loop.run_forever()

        th = threading.Thread(target=run_loop, daemon=True)
        th.start()
        started.wait(10)
        port = box["addr"][1]
        paced_client(port, names[:5], 50, 0.1)
        allow_ms.clear()
        cpu0 = time.clock_gettime(box["clock"])
        q0 = proxy.stats.queries
        proxied = paced_client(port, names, args.rate, seconds)
        cpu = time.clock_gettime(box["clock"]) - cpu0
        queries = proxy.stats.queries - q0
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)

    steered = None if args.no_lab else steered_phase(args.rate, seconds)
    result = {
        "benchmark": "dns", "quick": args.quick, "rate_qps": args.rate,
        "seconds_per_phase": seconds, "names": args.names, "endpoints": args.endpoints,
        "direct_ms": {"p50": pct(direct, 50), "p99": pct(direct, 99), "n": len(direct)},
        "proxied_ms": {"p50": pct(proxied, 50), "p99": pct(proxied, 99), "n": len(proxied)},
        "added_ms": {"p50": pct(proxied, 50) - pct(direct, 50),
                     "p99": pct(proxied, 99) - pct(direct, 99)},
        "ratio_p50": pct(proxied, 50) / pct(direct, 50),
        "answer_to_allow_ms": {"p50": pct(allow_ms, 50), "p99": pct(allow_ms, 99),
                               "n": len(allow_ms), "mean": statistics.fmean(allow_ms)
                               if allow_ms else None,
                               "note": "policy computation only (no kernel map writes)"},
        "proxy_cpu_us_per_query": cpu / max(queries, 1) * 1e6,
        "hold_timeouts": proxy.stats.hold_timeouts,
        "steered": steered,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dns.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"DNS at {args.rate:.0f} q/s, {seconds:.0f} s per phase, {args.names} names")
    print(f"  direct   p50 {result['direct_ms']['p50']:.3f} ms  p99 "
          f"{result['direct_ms']['p99']:.3f} ms")
    print(f"  proxied  p50 {result['proxied_ms']['p50']:.3f} ms  p99 "
          f"{result['proxied_ms']['p99']:.3f} ms  (x{result['ratio_p50']:.2f} at p50)")
    a = result["answer_to_allow_ms"]
    print(f"  answer → allowed (policy part)  p50 {a['p50']:.3f} ms  p99 {a['p99']:.3f} ms")
    print(f"  proxy CPU {result['proxy_cpu_us_per_query']:.0f} µs/query; "
          f"hold timeouts {result['hold_timeouts']}")
    if steered is not None:
        d, st, f = steered["direct_ms"], steered["steered_ms"], steered["first_lookup_ms"]
        e = steered["answer_to_allow_ms_estimate"]
        print("  lab, from a pod to the lab DNS server:")
        print(f"    direct   p50 {d['p50']:.3f} ms  p99 {d['p99']:.3f} ms  (n {d['n']})")
        print(f"    steered  p50 {st['p50']:.3f} ms  p99 {st['p99']:.3f} ms  (n {st['n']})")
        print(f"    first lookup of a name  p50 {f['p50']:.3f} ms  p99 {f['p99']:.3f} ms; "
              f"answer → allowed ≈ p50 {e['p50']:.3f} ms  p99 {e['p99']:.3f} ms")
        print(f"    proxy: {steered['proxy_stats']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
