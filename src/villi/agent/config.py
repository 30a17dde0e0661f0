"""Agent settings: flags, an optional YAML file, defaults — in that order of precedence."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from villi.errors import VilliError

DEFAULT_SOCKET = Path("/var/run/villi/villi.sock")
DEFAULT_STATE_ROOT = Path("/var/lib/villi")
AGGREGATION_LEVELS = {"none": 0, "low": 1, "medium": 2, "maximum": 3}


@dataclass
class AgentConfig:
    """Everything an agent needs to know about its node and its cluster."""

    node: str
    cluster: str = "default"
    kvstore: str = "embedded:///var/lib/villi/kvstore.db"
    api_socket: Path = DEFAULT_SOCKET
    state_dir: Path | None = None
    node_ip: str | None = None
    pod_cidr: str | None = None
    cluster_cidr: str = "10.64.0.0/10"
    ipam_node_update_rate: float = 15.0
    ipam: str = "cluster-pool"
    #: ClusterMesh (docs/clustermesh.md): this cluster's name in the mesh (the
    #: io.cilium.k8s.policy.cluster label; default: --cluster), its id (0 = no mesh),
    #: the mesh size (255: cluster id in identity bits 16-23; 511: bits 15-23), where
    #: remote state comes from, and the remote clusters (NAME, or NAME=URL for direct).
    cluster_name: str | None = None
    cluster_id: int = 0
    max_connected_clusters: int = 255
    clustermesh_mode: str = "kvstoremesh"
    remote_cluster: list[str] = field(default_factory=list)
    clustermesh_sync_timeout: float = 15.0
    #: Node and ipcache entries live under this lease: an agent that is down (or cut off
    #: from the store) for less than this keeps its pods reachable from every other node
    #: (fail-static, as Cilium's 15-minute default). A node removed on purpose is
    #: withdrawn at once (villi.operator.nodes), not after the TTL.
    lease_ttl: int = 900
    #: Upper bound (s) of the full-jitter sleeps between lease keep-alive retries and
    #: kvstore health probes (also limited to a third of the lease TTL).
    kvstore_retry_cap: float = 5.0
    #: Seconds between kvstore health probes; skipped while the store answers other
    #: requests (villi.agent.sync.StoreHealth). 2 s cost etcd N/2 requests/s.
    kvstore_health_interval: float = 30.0
    #: Cap (s) of the random pause before re-creating watches after etcd came back.
    kvstore_rewatch_jitter: float = 1.0
    monitor_aggregation: str = "medium"
    host_routing: bool = True
    allow_root_netns: bool = False
    metrics_port: int = 9962
    hubble_metrics_port: int = 9965
    flows_capacity: int = 4095
    flow_export: Path | None = None
    cidr_wait_timeout: float = 60.0
    pod_cidr_backoff_cap: float = 1.0
    start_jitter: float = 0.0
    neigh_gc_thresh: str = "off"
    events_ringbuf_size: int = 8 * 1024 * 1024
    service_cgroup: str | None = None
    flows_listen: str | None = None
    flows_token_file: Path | None = None
    flows_max_connections: int = 16
    flows_tls_cert: Path | None = None
    flows_tls_key: Path | None = None
    flows_tls_client_ca: Path | None = None
    hubble_metrics: str | None = None
    #: The DNS proxy in villi-proxy (Cilium's --tofqdns-* flags; docs/dns.md).
    tofqdns_dns_reject_response_code: str = "refused"
    tofqdns_min_ttl: int = 0
    tofqdns_endpoint_max_ip_per_hostname: int = 1000
    tofqdns_proxy_response_max_delay: float = 0.1
    #: Cilium's --enable-policy (default | always | never) and policy audit mode; the
    #: kvstore's settings (`villi config set`) override both at run time.
    enable_policy: str = "default"
    policy_audit_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.clustermesh_mode not in ("kvstoremesh", "direct"):
            raise VilliError(f"--clustermesh-mode must be kvstoremesh or direct, not "
                             f"{self.clustermesh_mode!r}")
        if self.start_jitter < 0:
            raise VilliError(f"--start-jitter must be >= 0 seconds, not {self.start_jitter}")
        if self.pod_cidr_backoff_cap <= 0:
            raise VilliError("--pod-cidr-backoff-cap must be > 0 seconds, not "
                             f"{self.pod_cidr_backoff_cap}")
        if self.tofqdns_dns_reject_response_code not in ("refused", "nameError"):
            raise VilliError("--tofqdns-dns-reject-response-code must be refused or "
                             f"nameError, not {self.tofqdns_dns_reject_response_code!r}")
        if self.enable_policy not in ("default", "always", "never"):
            raise VilliError(f"--enable-policy must be default, always or never, not "
                             f"{self.enable_policy!r}")
        if self.kvstore_health_interval <= 0:
            raise VilliError("--kvstore-health-interval must be > 0 seconds, not "
                             f"{self.kvstore_health_interval}")
        if self.kvstore_rewatch_jitter < 0:
            raise VilliError("--kvstore-rewatch-jitter must be >= 0 seconds, not "
                             f"{self.kvstore_rewatch_jitter}")
        if self.neigh_gc_thresh not in ("auto", "off"):
            raise VilliError(f"--neigh-gc-thresh must be auto or off, not "
                             f"{self.neigh_gc_thresh!r}")

    @property
    def mesh_name(self) -> str:
        """The cluster's name in a mesh and in its pods' cluster label."""
        return self.cluster_name or self.cluster

    @property
    def state_path(self) -> Path:
        return self.state_dir or DEFAULT_STATE_ROOT / self.cluster / self.node

    @property
    def aggregation_level(self) -> int:
        try:
            return AGGREGATION_LEVELS[self.monitor_aggregation]
        except KeyError:
            raise VilliError(f"--monitor-aggregation must be one of "
                             f"{', '.join(AGGREGATION_LEVELS)}, not {self.monitor_aggregation!r}"
                             ) from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--node", required=True, help="this node's name")
    ap.add_argument("--config", type=Path, help="YAML file with settings (flags win)")
    ap.add_argument("--cluster", help="cluster name (default: default)")
    ap.add_argument("--cluster-name", help="this cluster's name in a ClusterMesh (the "
                    "io.cilium.k8s.policy.cluster label of its pods; default: --cluster)")
    ap.add_argument("--cluster-id", type=int, help="this cluster's id in a ClusterMesh, "
                    "1..255 (1..511); 0 = not in a mesh (default)")
    ap.add_argument("--max-connected-clusters", type=int, choices=[255, 511],
                    help="mesh size: 255 (cluster id in identity bits 16-23, default) or "
                    "511 (bits 15-23, half the identities per cluster)")
    ap.add_argument("--clustermesh-mode", choices=["kvstoremesh", "direct"],
                    help="kvstoremesh: read remote clusters from the local kvstore's cache "
                    "(default); direct: connect to every remote kvstore (comparison only)")
    ap.add_argument("--remote-cluster", action="append", metavar="NAME[=URL]",
                    help="a remote cluster to wait for at start (and, in direct mode, its "
                    "kvstore URL); repeat for each")
    ap.add_argument("--clustermesh-sync-timeout", type=float, metavar="SECONDS",
                    help="at start, wait at most this long for the remote clusters' sync "
                    "canaries before regenerating endpoints (15)")
    ap.add_argument("--kvstore", help="store URL: embedded:///path.db, memory://, "
                    "http://host:2379[,http://...] for etcd")
    ap.add_argument("--kvstore-endpoints", dest="kvstore", help="alias of --kvstore")
    ap.add_argument("--api-socket", type=Path, help=f"unix socket (default {DEFAULT_SOCKET})")
    ap.add_argument("--state-dir", type=Path, help="where endpoint and IPAM state persist")
    ap.add_argument("--node-ip", help="this node's IP on the underlay (default: first global)")
    ap.add_argument("--pod-cidr", help="static pod CIDR instead of waiting for the operator")
    ap.add_argument("--cluster-cidr", help="the cluster's pod range (default 10.64.0.0/10)")
    ap.add_argument("--ipam-node-update-rate", type=float,
                    help="min seconds between IPAM usage reports (15; key "
                    "ipam/v1/usage/<node>, read by the operator)")
    ap.add_argument("--ipam", choices=["cluster-pool", "eni"],
                    help="cluster-pool (pod CIDRs from the operator, default) or eni (IPs of "
                    "cloud interfaces the operator attaches; see docs/ipam.md)")
    ap.add_argument("--lease-ttl", type=int, help="TTL in seconds of the lease that holds "
                    "this node's entry and its pods' ipcache entries (900): how long other "
                    "nodes keep routing to its pods while this agent is down")
    ap.add_argument("--kvstore-retry-cap", type=float, help="max seconds between lease "
                    "keep-alive retries and kvstore health probes (5; full jitter below it)")
    ap.add_argument("--kvstore-health-interval", type=float, metavar="SECONDS",
                    help="seconds between kvstore reachability probes, skipped while the "
                    "store answers other requests (30; each probe is one request to etcd)")
    ap.add_argument("--kvstore-rewatch-jitter", type=float, metavar="SECONDS",
                    help="after etcd comes back, wait a random 0..SECONDS before "
                    "re-creating watches, so a cluster's agents do not all re-watch at once "
                    "(1; etcd only)")
    ap.add_argument("--monitor-aggregation", choices=sorted(AGGREGATION_LEVELS))
    ap.add_argument("--no-host-routing", dest="host_routing", action="store_false",
                    default=None, help="deliver same-node traffic through the node's stack")
    ap.add_argument("--allow-root-netns", action="store_true", default=None,
                    help="allow running in the machine's root network namespace")
    ap.add_argument("--metrics-port", type=int, help="agent Prometheus port (9962, 0 = off)")
    ap.add_argument("--hubble-metrics-port", type=int, help="flow metrics port (9965, 0 = off)")
    ap.add_argument("--flows-capacity", type=int, help="flows kept in memory (4095)")
    ap.add_argument("--flow-export", type=Path, help="write flows as JSON lines to this file")
    ap.add_argument("--flow-export-filter", help="only export flows matching this filter, "
                    "e.g. verdict=DROPPED (FIELD=VALUE[,FIELD=VALUE...], fields as in "
                    "villi observe)")
    ap.add_argument("--service-cgroup",
                    help="cgroup v2 directory whose processes get socket-level service load "
                    "balancing (default <cgroup2>/villi/<cluster>/<node>; the cgroup2 root "
                    "for a whole machine; 'none' to disable)")
    ap.add_argument("--start-jitter", type=float, metavar="SECONDS",
                    help="wait a random 0..SECONDS before connecting to the kvstore, so "
                    "agents restarted together (a node-image rollout) do not all list at "
                    "once (default 0; restored endpoints keep working meanwhile)")
    ap.add_argument("--pod-cidr-backoff-cap", type=float, metavar="SECONDS",
                    help="longest sleep (full jitter) between polls for the operator's pod "
                    "CIDR (1)")
    ap.add_argument("--neigh-gc-thresh", metavar="auto|off",
                    help="auto: raise net.ipv4.neigh.default.gc_thresh1/2/3 for this node's "
                    "pod capacity and underlay subnet where this namespace has them (a real "
                    "host); in a node namespace they are machine-wide and only reported")
    ap.add_argument("--flows-listen", metavar="HOST:PORT",
                    help="also serve the flow API on TCP for villi relay (needs "
                    "--flows-token-file; Hubble's port is 4244)")
    ap.add_argument("--flows-token-file", type=Path,
                    help="file holding the bearer token TCP flow readers must present")
    ap.add_argument("--flows-max-connections", type=int,
                    help="concurrent TCP flow readers (16)")
    ap.add_argument("--flows-tls-cert", type=Path, help="serve the TCP flow API over TLS "
                    "with this certificate (PEM; with --flows-tls-key)")
    ap.add_argument("--flows-tls-key", type=Path, help="the certificate's private key")
    ap.add_argument("--flows-tls-client-ca", type=Path,
                    help="require client certificates signed by this CA (mTLS); then the "
                    "token is optional")
    ap.add_argument("--hubble-metrics",
                    help="flow metrics to enable, Hubble's syntax: 'drop flow "
                    "policy:sourceContext=app;destinationContext=pod' or comma-separated "
                    "names (default: dns,drop,tcp,flow,port-distribution,icmp,httpV2,policy,"
                    "flows-to-world)")
    ap.add_argument("--tofqdns-dns-reject-response-code", choices=["refused", "nameError"],
                    help="the DNS proxy's answer to a query no DNS rule allows (refused)")
    ap.add_argument("--tofqdns-min-ttl", type=int,
                    help="seconds a learned IP stays allowed at least, whatever its TTL (0)")
    ap.add_argument("--tofqdns-endpoint-max-ip-per-hostname", type=int,
                    help="IPs one name may open per endpoint; the oldest go first (1000)")
    ap.add_argument("--tofqdns-proxy-response-max-delay", type=float, metavar="SECONDS",
                    help="longest hold of a DNS answer while its IPs are allowed (0.1)")
    ap.add_argument("--enable-policy", choices=["default", "always", "never"],
                    help="default: enforce where a rule selects the endpoint; always: "
                    "default deny everywhere; never: no policy (Cilium's modes; `villi "
                    "config set EnablePolicy=...` overrides at run time)")
    ap.add_argument("--policy-audit-mode", action="store_true", default=None,
                    help="forward what policy would drop and report it as AUDIT (`villi "
                    "config set PolicyAuditMode=...` overrides at run time)")
    ap.add_argument("--events-ringbuf-size", type=int,
                    help="bytes of the datapath's event ring (power of two, default 8 MiB)")


def from_args(args: argparse.Namespace) -> AgentConfig:
    values: dict[str, Any] = {}
    if args.config:
        try:
            data = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise VilliError(f"cannot read agent config {args.config}: {e}") from e
        known = {f.name for f in fields(AgentConfig)}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise VilliError(f"{args.config}: unknown setting {key!r}")
            values[name] = value
    for f in fields(AgentConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    filt = getattr(args, "flow_export_filter", None)
    if filt:
        preds: dict[str, list[str]] = {}
        for part in filt.split(","):
            field, _, value = part.partition("=")
            preds.setdefault(field.strip(), []).append(value.strip())
        values.setdefault("extra", {})["flow_export_filter"] = [
            {"field": f, "values": v, "negate": False} for f, v in preds.items()]
    if values.get("hubble_metrics") is not None:
        from villi.observer.metricsconfig import parse as parse_metrics

        parse_metrics(values["hubble_metrics"])   # a bad value fails before anything starts
    for p in ("api_socket", "state_dir", "flow_export", "flows_token_file", "flows_tls_cert",
              "flows_tls_key", "flows_tls_client_ca"):
        if isinstance(values.get(p), str):
            values[p] = Path(values[p])
    return AgentConfig(**values)
