#!/usr/bin/env python3
"""The seed's scale on real etcd (issue 16): 20,000 nodes, 350,000 pods, 3,000 policies.

Real: etcd (the ``etcd`` binary, one member, loopback and a unix socket), every key
written with villi's key formats and its etcd client, one real ``villi agent`` in a
node namespace with its real datapath. Simulated: the other N-1 agents, as lightweight
sessions spread over --workers processes (``_scale_fleet.py`` running
``_scale_sessions.py``: lease keep-alive, node entry, multiplexed watches of the shared
prefixes; they count the events instead of decoding them and do not download the full
listings).

Phases (``--phases``):
  populate  N-1 leases, node entries under them, I identities, namespaces and K
            policies, P ipcache entries under their nodes' leases; DB size.
  agent     the real agent syncs it: time to ready, ipcache map count, RSS (and per
            remote pod, against the same agent on an empty store), endpoint creation,
            policy change → kernel p50/p99 (the N-1 sessions keep their leases alive).
  steady    the sessions watch; pod churn writes ipcache entries and IPAM reports (at
            most one per node per --ipam-node-update-rate); etcd's request rate and
            latency, events delivered, etcd CPU and memory.
  herd      etcd restarted under the sessions, --restarts times per strategy (none,
            equal, full jitter); requests issued per 100 ms; peak/mean over the
            recovery window; each session's time back to watching.
  storm     sessions (all, or --storm-sessions) restart at once, without and with
            --start-jitter (it runs before the herd, so a --deadline keeps both).

    .venv/bin/python bench/scale.py --quick        # about a minute
    nice -n 19 .venv/bin/python bench/scale.py     # the seed's size

Writes bench/results/scale.json (``--out``) and, with --plots DIR, PNGs there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
# The agent runs as `python -m villi.cli.main`: the same source tree as this script.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)

import httpx  # noqa: E402
from _scale_fleet import Fleet  # noqa: E402
from _scale_sessions import CAP, WINDOW, pct  # noqa: E402
from _scale_state import ClusterState, Size, node_name, populate  # noqa: E402

from villi.errors import StoreError  # noqa: E402
from villi.kvstore import EtcdStore  # noqa: E402
from villi.kvstore import schema as keys  # noqa: E402
from villi.testing.etcd import EtcdServer  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "scale.json"
PHASES = ("populate", "agent", "steady", "herd", "storm")
STRATEGIES = ("none", "equal", "full")


def past_deadline(args: argparse.Namespace) -> bool:
    """True once the --deadline (HH:MM UTC) has passed: no new phase or restart starts."""
    if not args.deadline:
        return False
    hh, mm = (int(x) for x in args.deadline.split(":"))
    now = time.gmtime()
    return (now.tm_hour, now.tm_min) >= (hh, mm)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- etcd observations ----------------------------------------------------------------------
def etcd_metrics(server: EtcdServer) -> dict[str, float]:
    text = httpx.get(server.endpoint + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{"):
            method = re.search(r'grpc_method="([^"]+)"', line)
            if method:
                key = "rpc:" + method.group(1)
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        for name in ("etcd_mvcc_db_total_size_in_bytes", "process_resident_memory_bytes",
                     "process_cpu_seconds_total", "etcd_debugging_mvcc_watcher_total",
                     "etcd_debugging_mvcc_keys_total"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def rpc_rates(before: dict[str, float], after: dict[str, float], seconds: float
              ) -> dict[str, float]:
    return {k[4:]: round((after.get(k, 0) - before.get(k, 0)) / seconds, 1)
            for k in after if k.startswith("rpc:") and after.get(k, 0) > before.get(k, 0)}


def peak_over_mean(series: list[int]) -> dict[str, Any]:
    if not series or not sum(series):
        return {"peak": 0, "mean": 0.0, "ratio": None}
    mean = sum(series) / len(series)
    return {"peak": max(series), "mean": round(mean, 2), "ratio": round(max(series) / mean, 2)}


# --- phases ---------------------------------------------------------------------------------
async def phase_agent(args: argparse.Namespace, server: EtcdServer, store: EtcdStore,
                      state: ClusterState, baseline_kib: int | None) -> dict[str, Any]:
    import _scale_agent

    loop = asyncio.get_running_loop()

    def put(key: str, value: bytes) -> int:
        # The agent phase runs in a thread (pyroute2, blocking polls); writes go to the
        # store on this loop, which keeps the sessions' leases alive meanwhile.
        return asyncio.run_coroutine_threadsafe(store.put(key, value), loop).result()

    def run() -> dict[str, Any]:
        return _scale_agent.run(
            "unix://" + str(server.socket_path), put, state, local_pods=args.local_pods,
            changes=args.policy_changes, timeout=args.agent_timeout)

    result = await asyncio.to_thread(run)
    remote = state.size.pods
    rss = result["rss_kib_ready"]
    result["rss_mib_ready"] = round(rss / 1024, 1)
    result["rss_bytes_per_remote_pod"] = round(rss * 1024 / remote, 1)
    if baseline_kib:
        result["baseline_rss_kib"] = baseline_kib
        result["rss_growth_bytes_per_remote_pod"] = round((rss - baseline_kib) * 1024 / remote, 1)
    return result


async def churn(fleet: Fleet, store: EtcdStore, state: ClusterState, rate: float,
                ipam_rate: float, stop: asyncio.Event) -> None:
    """Pod churn: re-publish ipcache entries (under their node's lease); IPAM usage
    reports at most once per node per ``ipam_rate`` seconds, as the agent's
    RateLimitedReporter does. Written from this process (the sessions only watch)."""
    rng = random.Random(7)
    last_report: dict[int, float] = {}
    rec = fleet.rec
    serial = 0

    async def timed(kind: str, coro: Any) -> None:
        t = rec.issue(kind)
        try:
            await coro
        except StoreError:
            rec.done(kind, t, ok=False)
        else:
            rec.done(kind, t)

    pending: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        serial += 1
        j = rng.randrange(state.size.pods)
        node, ip, entry = state.pod(j)
        node_i = int(node.split("-")[1])
        lease = fleet.leases[node_i]
        entry["podName"] = f"{entry['podName']}-{serial}"
        for coro in [("ipcache_put", store.put(keys.ipcache_key(ip), json.dumps(entry).encode(),
                                                lease=lease))]:
            t = asyncio.create_task(timed(*coro))
            pending.add(t)
            t.add_done_callback(pending.discard)
        now = time.monotonic()
        if now - last_report.get(node_i, -1e9) >= ipam_rate:
            # The usage report has its own key (villi.ipam.usage): no agent watches it,
            # so a report costs etcd one write and no watch event.
            last_report[node_i] = now
            t = asyncio.create_task(timed("usage_put", store.put(
                keys.usage_key(node), state.usage_report(node_i, serial % 2), lease=lease)))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.sleep(1.0 / rate)
    if pending:
        await asyncio.wait(pending, timeout=30)


async def phase_steady(args: argparse.Namespace, server: EtcdServer, fleet: Fleet,
                       store: EtcdStore, state: ClusterState) -> dict[str, Any]:
    await fleet.stop()
    await fleet.record(time.monotonic())
    await fleet.start(watch=True)
    setup_s = await fleet.wait_watching(args.watch_timeout)
    log(f"steady: {fleet.count} sessions watching after {setup_s:.1f} s")
    await asyncio.sleep(2.0)
    events0 = (await fleet.collect()).events
    m0 = etcd_metrics(server)
    t0 = time.monotonic()
    await fleet.record(t0)
    stop = asyncio.Event()
    writer = asyncio.create_task(churn(fleet, store, state, args.churn,
                                       args.ipam_node_update_rate, stop))
    await asyncio.sleep(args.steady_seconds)
    stop.set()
    await writer
    seconds = time.monotonic() - t0
    m1 = etcd_metrics(server)
    rec = await fleet.collect()
    return {
        "watch_setup_s": round(setup_s, 2), "seconds": round(seconds, 1),
        "client_requests_per_s": {k: round(v / seconds, 1) for k, v in rec.kinds.items()},
        "client_errors": dict(rec.errors),
        "latency_ms": {k: {"p50": round(1000 * (pct(v, 0.5) or 0), 2),
                           "p99": round(1000 * (pct(v, 0.99) or 0), 2), "n": len(v)}
                       for k, v in rec.latency.items()},
        "etcd_rpcs_per_s": rpc_rates(m0, m1, seconds),
        "etcd_cpu_cores": round((m1.get("process_cpu_seconds_total", 0)
                                 - m0.get("process_cpu_seconds_total", 0)) / seconds, 2),
        "etcd_rss_mib": round(m1.get("process_resident_memory_bytes", 0) / 2**20, 1),
        "etcd_watchers": m1.get("etcd_debugging_mvcc_watcher_total"),
        "events_delivered_per_s": round((rec.events - events0) / seconds, 1),
        "ipcache_puts_per_s": round(rec.kinds.get("ipcache_put", 0) / seconds, 2),
        "keepalive_required_per_s": round(fleet.count / (fleet.ttl / 3), 1),
        "keepalive_range_per_s": [round(fleet.count / (fleet.ttl / 3), 1),
                                  round(fleet.count / (fleet.ttl / 6), 1)],
    }


async def restart_once(server: EtcdServer, store: EtcdStore, fleet: Fleet,
                       strategy: str, timeout: float, outage: float) -> dict[str, Any]:
    await fleet.wait_watching(timeout)
    await fleet.configure(strategy=strategy, revision=await store.revision())
    await asyncio.sleep(0.5)
    t_stop = time.monotonic()
    await fleet.record(t_stop)
    # SIGKILL: the process exits at once (a crash, an OOM kill, a node reboot) and
    # every connection resets; a graceful stop leaves requests hanging on open
    # connections until it finishes, which hides the clients' backoff.
    await asyncio.to_thread(server._kill)
    if server.socket_path:  # a killed etcd leaves its unix socket behind
        Path(server.socket_path).unlink(missing_ok=True)
    # Down for --outage seconds (the time a crashed member takes to come back): the
    # clients' attempts fail fast meanwhile, and their backoff shapes the return.
    await asyncio.sleep(max(0.0, outage - (time.monotonic() - t_stop)))
    await asyncio.to_thread(server.start, 300.0)
    t_up = time.monotonic()
    all_s = await fleet.wait_watching(timeout)
    rec = await fleet.collect()
    t_all = max(rec.back_at)
    series = rec.series(until=t_all)
    first = int((t_up - t_stop) / WINDOW)
    window = series[first:int((t_all - t_stop) / WINDOW) + 1]
    back = [b - t_up for b in rec.back_at]
    attempts = rec.series(until=t_all, kind="reconnect")
    return {
        "strategy": strategy, "down_s": round(t_up - t_stop, 2),
        "all_back_after_up_s": round(t_all - t_up, 2), "wait_s": round(all_s, 2),
        "back_p50_s": round(pct(back, 0.5) or 0, 2), "back_p99_s": round(pct(back, 0.99) or 0, 2),
        "recovery": peak_over_mean(window),
        # Over a fixed window (cap + 1 s after etcd is back), so that a single
        # synchronised wave is not flattered by its own short recovery window.
        "recovery_fixed_window": peak_over_mean(
            (series + [0] * int((CAP + 1) / WINDOW))[first:first + int((CAP + 1) / WINDOW)]),
        "recovery_reconnects_only": peak_over_mean(
            attempts[first:int((t_all - t_stop) / WINDOW) + 1]),
        "attempts_mean": round(sum(rec.attempts) / len(rec.attempts), 2),
        "requests": dict(rec.kinds), "series_100ms": series, "up_index": first,
        "reconnect_series_100ms": attempts,
    }


async def phase_herd(args: argparse.Namespace, server: EtcdServer, store: EtcdStore,
                     sessions: Fleet) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    # Interleaved (none, equal, full, none, ...): a run cut short by --deadline still
    # has every strategy.
    for r in range(args.restarts):
        for strategy in STRATEGIES:
            if past_deadline(args):
                log(f"herd: --deadline reached, stopping after {len(runs)} restarts")
                break
            res = await restart_once(server, store, sessions, strategy, args.watch_timeout,
                                     args.outage)
            log(f"herd {strategy} #{r + 1}: down {res['down_s']} s, all back "
                f"{res['all_back_after_up_s']} s after up, peak/mean "
                f"{res['recovery']['ratio']}")
            runs.append(res)
    summary = {}
    for strategy in STRATEGIES:
        mine = [r for r in runs if r["strategy"] == strategy]
        summary[strategy] = {
            "peak_over_mean": [r["recovery"]["ratio"] for r in mine],
            "peak_over_mean_reconnects": [r["recovery_reconnects_only"]["ratio"] for r in mine],
            "peak_per_100ms": [r["recovery"]["peak"] for r in mine],
            "peak_over_mean_fixed_window": [r["recovery_fixed_window"]["ratio"] for r in mine],
            "all_back_after_up_s": [r["all_back_after_up_s"] for r in mine],
            "back_p99_s": [r["back_p99_s"] for r in mine]}
    return {"runs": runs, "summary": summary,
            "backoff": {"base": 0.05, "cap": CAP, "rewatch_jitter": args.rewatch_jitter}}


async def phase_storm(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    out = {}
    for jitter in (0.0, args.start_jitter):
        if past_deadline(args):
            log("storm: --deadline reached, skipped")
            break
        await fleet.stop()
        t0 = time.monotonic()
        await fleet.storm(jitter, t0, args.watch_timeout)
        rec = await fleet.collect()
        t_all = max(rec.back_at)
        series = rec.series(until=t_all)
        ratio = peak_over_mean(series)
        out[f"jitter_{jitter:g}s"] = {
            "start_jitter_s": jitter, "sessions": fleet.count,
            "all_watching_s": round(t_all - t0, 2),
            "peak_per_100ms": ratio["peak"], "ratio": ratio["ratio"],
            "requests": dict(rec.kinds),
            "latency_p99_ms": {k: round(1000 * (pct(v, 0.99) or 0), 1)
                               for k, v in rec.latency.items()},
            "series_100ms": series}
        log(f"storm jitter {jitter:g} s: all watching after {t_all - t0:.1f} s, "
            f"peak {max(series)}/100 ms")
    await fleet.stop()
    return out


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    herd = result.get("herd")
    if herd:
        fig, axes = plt.subplots(len(STRATEGIES), 1, figsize=(9, 8), sharex=True)
        for ax, strategy in zip(axes, STRATEGIES, strict=True):
            for i, run in enumerate(r for r in herd["runs"] if r["strategy"] == strategy):
                up = run["up_index"]
                ys = [v * 10 for v in run["series_100ms"][up:]]
                ax.plot([k * WINDOW for k in range(len(ys))], ys, lw=0.9,
                        label=f"restart {i + 1}: peak/mean {run['recovery']['ratio']}")
            ax.set_title(f"{strategy} jitter", fontsize=10)
            ax.set_ylabel("requests/s")
            ax.legend(fontsize=8)
        axes[-1].set_xlabel("seconds after etcd is back (100 ms windows)")
        fig.suptitle(f"Thundering herd: {result['size']['nodes'] - 1} sessions reconnecting")
        fig.tight_layout()
        path = out_dir / "scale-herd.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(str(path))
    storm = result.get("storm")
    if storm:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        for run in storm.values():
            ys = [v * 10 for v in run["series_100ms"]]
            ax.plot([k * WINDOW for k in range(len(ys))], ys, lw=0.9,
                    label=f"--start-jitter {run['start_jitter_s']:g} s: all watching "
                          f"after {run['all_watching_s']} s")
        ax.set_xlabel("seconds after the restart")
        ax.set_ylabel("requests/s")
        ax.legend(fontsize=8)
        ax.set_title("Agent start storm (simulated sessions)")
        fig.tight_layout()
        path = out_dir / "scale-storm.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(str(path))
    return made


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Write what is measured so far (every phase ends with a save)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    size = Size(nodes=args.nodes, pods=args.pods, policies=args.policies,
                namespaces=args.namespaces)
    phases = set(args.phases.split(","))
    result: dict[str, Any] = {
        "size": {"nodes": size.nodes, "pods": size.pods, "policies": size.policies,
                 "identities": size.identities, "namespaces": size.namespaces},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                    "kernel": platform.release(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plots")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    state = ClusterState(size)
    server = EtcdServer(unix_socket=True)
    server.start()
    store = EtcdStore(server.endpoint, request_timeout=60)
    fleet = Fleet(server.endpoint, args.session_ttl, workers=args.workers,
                  clients=args.clients)
    try:
        result["etcd_version"] = httpx.get(server.endpoint + "/version", timeout=5).json()
        baseline = None
        if "agent" in phases:
            import _scale_agent

            log("agent baseline (empty store)")
            baseline = await asyncio.to_thread(_scale_agent.baseline_rss,
                                               "unix://" + str(server.socket_path))
        log(f"populate: {size}")

        async def grant(indices: list[int]) -> dict[int, Any]:
            # Granted here, a chunk at a time (etcd grants ~300/s on this machine; the
            # workers' keep-alive loops would slow it), each chunk handed at once to the
            # workers, which keep those leases alive from then on.
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> tuple[int, str, bytes, Any]:
                async with sem:
                    lease = await store.grant_lease(args.session_ttl)
                return i, node_name(i), json.dumps(state.node_entry(i)).encode(), lease

            for k in range(0, len(indices), 1000):
                await fleet.adopt(list(await asyncio.gather(
                    *(one(i) for i in indices[k:k + 1000]))))
            return dict(fleet.leases)

        await fleet.configure(rewatch_jitter=args.rewatch_jitter,
                              storm_republish=args.storm_republish)
        result["populate"] = await populate(store, state, args.session_ttl, grant)
        m = etcd_metrics(server)
        result["populate"]["etcd_db_mib"] = round(m.get("etcd_mvcc_db_total_size_in_bytes", 0)
                                                  / 2**20, 1)
        result["populate"]["etcd_keys"] = m.get("etcd_debugging_mvcc_keys_total")
        log(f"populate done: {result['populate']['total_s']:.1f} s, "
            f"DB {result['populate']['etcd_db_mib']} MiB")
        save(args, result)
        if "agent" in phases:
            log("agent: one real agent syncs the state")
            result["agent"] = await phase_agent(args, server, store, state, baseline)
            a = result["agent"]
            log(f"agent ready {a['ready_s']:.1f} s, RSS {a['rss_mib_ready']} MiB, policy "
                f"change p99 {a['policy_change_s']['p99'] * 1000:.1f} ms")
            save(args, result)
        if ("steady" in phases or "herd" in phases) and not past_deadline(args):
            result["steady"] = await phase_steady(args, server, fleet, store, state)
            log(f"steady: {result['steady']['etcd_rpcs_per_s']}")
            save(args, result)
        if "storm" in phases and not past_deadline(args):
            result["storm"] = await phase_storm(args, fleet)
            save(args, result)
            if "herd" in phases:
                await fleet.start(watch=True)
                await fleet.wait_watching(args.watch_timeout)
        if "herd" in phases and not past_deadline(args):
            result["herd"] = await phase_herd(args, server, store, fleet)
            save(args, result)

        m = etcd_metrics(server)
        result["etcd_end"] = {"db_mib": round(m.get("etcd_mvcc_db_total_size_in_bytes", 0)
                                              / 2**20, 1),
                              "rss_mib": round(m.get("process_resident_memory_bytes", 0)
                                               / 2**20, 1)}
    finally:
        await fleet.close()
        await store.close()
        server.close()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["machine"]["load_avg_end"] = os.getloadavg()
    return result


def _ok(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= goal else "**not met**"


def report(result: dict[str, Any]) -> str:
    """The figures of a result as Markdown tables, each next to its goal."""
    size = result["size"]
    lines = [f"Size: {size['nodes']:,} nodes ({size['nodes'] - 1:,} simulated + 1 real agent), "
             f"{size['pods']:,} pods, {size['identities']:,} identities, "
             f"{size['policies']:,} policies, {size['namespaces']} namespaces. "
             f"Run {result['started']} → {result.get('finished', '(cut short)')}, "
             f"{result['machine']['cpus']} CPUs, kernel {result['machine']['kernel']}, "
             f"etcd {result.get('etcd_version', {}).get('etcdserver', '?')}.", ""]
    pop = result.get("populate")
    if pop:
        lines += ["| populate | value |", "|---|---|",
                  f"| leases granted | {pop['keys']['leases']:,} in {pop['leases_s']:.1f} s |",
                  f"| node entries | {pop['keys']['nodes']:,} in {pop['nodes_s']:.1f} s |",
                  f"| identities / namespaces + policies | {pop['keys']['identities']:,} / "
                  f"{pop['keys']['namespaces']:,} + {pop['keys']['policies']:,} |",
                  f"| ipcache entries | {pop['keys']['ipcache']:,} in {pop['ipcache_s']:.1f} s |",
                  f"| etcd DB size | {pop['etcd_db_mib']} MiB |", ""]
    a = result.get("agent")
    if a:
        pc = a["policy_change_s"]
        lines += [
            "| real agent | measured | goal | |", "|---|---|---|---|",
            f"| time to first ready (full sync) | {a['ready_s']:.1f} s | ≤ 60 s | "
            f"{_ok(a['ready_s'], 60)} |",
            f"| ipcache map entries at ready | {a['ipcache_map_entries']:,} "
            f"(≥ {a['ipcache_expected_min']:,} expected; max_entries "
            f"{a['ipcache_max_entries']:,}) | complete | "
            f"{'met' if a['ipcache_complete_at_ready'] else '**not met**'} |",
            f"| RSS at ready | {a['rss_mib_ready']} MiB | ≤ 512 MiB | "
            f"{_ok(a['rss_mib_ready'], 512)} |",
            f"| RSS per remote pod (growth over an empty-store agent of "
            f"{a.get('baseline_rss_kib', 0) / 1024:.0f} MiB) | "
            f"{a.get('rss_growth_bytes_per_remote_pod', 0):,.0f} B | ≤ 1,024 B | "
            f"{_ok(a.get('rss_growth_bytes_per_remote_pod'), 1024)} |",
            f"| endpoint creation (policy for a new pod) | "
            f"{', '.join(f'{x * 1000:.0f}' for x in a['endpoint_add_s'])} ms | | |",
            f"| policy map keys of the local endpoints | "
            f"{a['policy_map_keys_per_endpoint']} (agent's view: "
            f"{a['policy_view_entries']} entries) | complete | |",
            f"| policy change → kernel, p50 / p99 ({pc['n']} changes) | "
            f"{pc['p50'] * 1000:.1f} / {pc['p99'] * 1000:.1f} ms | p99 ≤ 50 ms | "
            f"{_ok(pc['p99'] * 1000, 50)} |", ""]
    st = result.get("steady")
    if st:
        lat = ", ".join(f"{k} {v['p50']}/{v['p99']} ms" for k, v in st["latency_ms"].items())
        lines += [
            "| steady state (simulated agents watching) | value |", "|---|---|",
            f"| watches set up | {st['etcd_watchers']:,.0f} watchers in "
            f"{st['watch_setup_s']} s |",
            f"| etcd RPCs/s | {st['etcd_rpcs_per_s']} |",
            f"| keep-alives needed at this TTL | {st['keepalive_required_per_s']}/s |",
            f"| client latency p50/p99 | {lat} |",
            f"| watch events delivered to the simulator | {st['events_delivered_per_s']:,.0f}/s "
            f"(owed: {st.get('ipcache_puts_per_s', 0) * (size['nodes'] - 1):,.0f}/s = "
            f"ipcache puts × {size['nodes'] - 1:,} watchers; usage reports owe none) |",
            f"| etcd CPU / RSS | {st['etcd_cpu_cores']} cores / {st['etcd_rss_mib']} MiB |",
            ""]
    storm = result.get("storm")
    if storm:
        lines += ["| start storm | sessions | all watching after | peak /100 ms | "
                  "peak ÷ mean |", "|---|---|---|---|---|"]
        for run in storm.values():
            lines.append(f"| --start-jitter {run['start_jitter_s']:g} s | {run['sessions']:,} | "
                         f"{run['all_watching_s']} s | {run['peak_per_100ms']} | "
                         f"{run['ratio']} |")
        lines.append("")
    herd = result.get("herd")
    if herd:
        lines += ["| etcd restart, strategy | down | all back after etcd is up | p99 back | "
                  "peak ÷ mean (recovery window) | peak ÷ mean (cap + 1 s window) | "
                  "peak /100 ms |", "|---|---|---|---|---|---|---|"]
        for run in herd["runs"]:
            lines.append(
                f"| {run['strategy']} | {run['down_s']} s | {run['all_back_after_up_s']} s | "
                f"{run['back_p99_s']} s | {run['recovery']['ratio']} | "
                f"{run.get('recovery_fixed_window', {}).get('ratio')} | "
                f"{run['recovery']['peak']} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 nodes, 3,000 pods: a smoke run")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--pods", type=int)
    ap.add_argument("--policies", type=int)
    ap.add_argument("--namespaces", type=int, help="x10 apps = identities")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--session-ttl", type=int, default=900,
                    help="lease TTL of the simulated agents (900, the agent's --lease-ttl "
                    "default; keep-alive every TTL/6..TTL/3)")
    ap.add_argument("--clients", type=int, default=4,
                    help="etcd clients the sessions of one worker process share")
    ap.add_argument("--churn", type=float, default=5.0, help="ipcache updates per second")
    ap.add_argument("--ipam-node-update-rate", type=float, default=15.0)
    ap.add_argument("--steady-seconds", type=float)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--outage", type=float, default=3.0,
                    help="seconds etcd stays down in each restart of the herd phase")
    ap.add_argument("--start-jitter", type=float)
    ap.add_argument("--local-pods", type=int, default=3)
    ap.add_argument("--policy-changes", type=int)
    ap.add_argument("--agent-timeout", type=float, default=900.0)
    ap.add_argument("--watch-timeout", type=float, default=600.0)
    ap.add_argument("--storm-republish", action="store_true",
                    help="in the start storm every session re-writes its node entry, as "
                    "villi's agent does today (N^2 watch events; default: only sessions "
                    "whose lease expired)")
    ap.add_argument("--workers", type=int, default=4,
                    help="processes the simulated sessions are spread over")
    ap.add_argument("--rewatch-jitter", type=float, default=1.0,
                    help="villi's pause before re-watching after a reconnect (the agent's "
                    "--kvstore-rewatch-jitter), used by the full-jitter strategy")
    ap.add_argument("--deadline", metavar="HH:MM",
                    help="UTC time after which no new phase or etcd restart starts "
                    "(results so far are in the JSON)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    args = ap.parse_args(argv)
    quick = dict(nodes=200, pods=3000, policies=300, namespaces=10, steady_seconds=5.0,
                 start_jitter=2.0, policy_changes=10)
    full = dict(nodes=20_000, pods=350_000, policies=3000, namespaces=300,
                steady_seconds=20.0, start_jitter=20.0, policy_changes=100)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.nodes < 2 or args.pods < 1:
        ap.error("--nodes must be >= 2 and --pods >= 1")
    if args.pods > (args.nodes - 1) * 124:
        ap.error(f"--pods {args.pods}: at most 124 per simulated node (/25 pod CIDRs)")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--report":
        result = json.loads(Path(sys.argv[2]).read_text())  # tables/plots of a saved run
        print(report(result))
        return 0
    args = parse_args(argv)
    result = asyncio.run(amain(args))
    if args.plots:
        result["plots"] = plots(result, args.plots)
    save(args, result)
    print(report(result))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
