"""``villi``: the command line. Each subcommand's module is imported only when used,
so ``villi --help`` and quick commands stay fast."""

from __future__ import annotations

import argparse
import sys

from villi.errors import VilliError


def _tls_arguments(ap: argparse.ArgumentParser, default: object) -> None:
    """``--kvstore-ca/--kvstore-cert/--kvstore-key`` (also accepted after ``agent`` and
    ``operator``: the subcommand's copy must not reset the global value, hence the
    SUPPRESS default there)."""
    ap.add_argument("--kvstore-ca", default=default, metavar="PEM",
                    help="CA that signed etcd's certificate (https:// endpoints)")
    ap.add_argument("--kvstore-cert", default=default, metavar="PEM",
                    help="client certificate presented to etcd (--client-cert-auth)")
    ap.add_argument("--kvstore-key", default=default, metavar="PEM",
                    help="private key of --kvstore-cert")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="villi", description="eBPF networking, security and "
                                 "observability for containers")
    ap.add_argument("--kvstore", "--kvstore-endpoints", dest="kvstore",
                    help="kvstore URL or etcd endpoints (default: the running lab, else "
                    "embedded:///var/lib/villi/kvstore.db)")
    ap.add_argument("--agent-socket", help="agent API socket (default: the lab's agents, "
                    "else /var/run/villi/villi.sock)")
    ap.add_argument("--netns", help="run inside this network namespace (name or path); "
                    "unlike `ip netns exec` it keeps the machine's /sys/fs/bpf")
    ap.add_argument("--cluster", dest="target_cluster", metavar="NAME",
                    help="in a multi-cluster lab: talk to this cluster (default: the first)")
    ap.add_argument("-v", "--verbose", action="store_true")
    _tls_arguments(ap, None)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    from villi.agent.config import add_arguments
    p = sub.add_parser("agent", help="run the node agent")
    add_arguments(p)
    _tls_arguments(p, argparse.SUPPRESS)

    p = sub.add_parser("operator", help="run the cluster operator (pod CIDRs, identity GC)")
    _tls_arguments(p, argparse.SUPPRESS)
    p.add_argument("--cluster-cidr", default="10.64.0.0/10")
    p.add_argument("--node-mask", "--node-cidr-mask", dest="node_cidr_mask", type=int,
                   default=24, help="prefix length of each node's pod CIDR (24)")
    p.add_argument("--node-grace-period", "--reclaim-grace", dest="reclaim_grace",
                   type=float, default=300.0, help="seconds a node whose entry vanished "
                   "(lease expired) keeps its pod CIDR (300); a node deleted on purpose "
                   "loses it at once")
    p.add_argument("--identity-gc-interval", type=float, default=900.0)
    p.add_argument("--resync-interval", type=float, default=300.0,
                   help="seconds between full pod CIDR passes when nothing changed (300)")
    p.add_argument("--retry-cap", type=float, default=30.0, help="max seconds between "
                   "retries of failed watches and passes (30; full jitter below it)")
    from villi.operator.eni_flags import add_eni_arguments
    add_eni_arguments(p)
    p.add_argument("--start-jitter", type=float, default=0.0, metavar="SECONDS",
                   help="wait a random 0..SECONDS before the first kvstore request")

    for name, verb in (("apply", "store"), ("delete", "remove")):
        p = sub.add_parser(name, help=f"{verb} resources (policies, namespaces, services)")
        p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE")

    p = sub.add_parser("get", help="list endpoints, identities, policies, services, nodes")
    p.add_argument("what", choices=["endpoints", "identities", "policies", "services", "nodes",
                                    "fqdn-cache"])
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--no-headers", action="store_true")

    p = sub.add_parser("status", help="agent, kvstore, datapath and IPAM health")
    p.add_argument("--brief", action="store_true", help="one line: OK or the first error")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")

    from villi.clustermesh.main import add_arguments as kvstoremesh_arguments
    p = sub.add_parser("kvstoremesh", help="cache remote clusters' state in this cluster's "
                       "kvstore (ClusterMesh)")
    kvstoremesh_arguments(p)
    _tls_arguments(p, argparse.SUPPRESS)

    sub.add_parser("demo", help="the main demonstration: the Star Wars scenario in a lab")

    from villi.cloudsim.main import add_arguments as add_cloudsim_arguments
    p = sub.add_parser("cloud-sim", help="run a simulated cloud provider API (ENI IPAM tests)")
    add_cloudsim_arguments(p)

    # Subcommand families with their own modules register their parsers themselves.
    from villi.cli import lab as lab_cli
    from villi.cli import observe as observe_cli

    lab_cli.add_parsers(sub)
    observe_cli.add_parsers(sub)
    from villi.cli import bpf as bpf_cli
    from villi.cli import policy_cmd

    policy_cmd.add_parsers(sub)   # villi policy trace|selectors|generate
    bpf_cli.add_parsers(sub)      # villi bpf …, villi endpoint get, villi identity get
    from villi.cli import policyops  # config, endpoint config, datapath/policy degrade

    policyops.add_parsers(sub)
    from villi.relay.main import add_arguments as relay_arguments

    relay_arguments(sub.add_parser("relay", help="merge the flows of every agent (Hubble "
                                   "Relay, with Hubble's gRPC Observer API)"))
    from villi.ui.main import add_arguments as ui_arguments

    ui_arguments(sub.add_parser("ui", help="web UI: service map, flows, explanations"))
    return ap


def _group_usage(ap: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """A command group given without its verb: print the group's usage (True)."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            group = action.choices[args.command]
            for sub in group._actions:
                if isinstance(sub, argparse._SubParsersAction) and \
                        getattr(args, sub.dest, None) is None:
                    group.print_help()
                    return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    import logging

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.kvstore_ca or args.kvstore_cert or args.kvstore_key:
            from villi.kvstore.tls import export_flags

            # Through the environment: every store this process opens, and every
            # process it starts (a lab's agents), uses the same certificates.
            export_flags(args.kvstore_ca, args.kvstore_cert, args.kvstore_key)
        if args.target_cluster:
            import os

            os.environ["VILLI_LAB_CLUSTER"] = args.target_cluster
        if args.netns:
            from villi._nsenter import enter_netns_for_good

            enter_netns_for_good(args.netns)
        handler = getattr(args, "handler", None)
        if handler is not None:   # commands registered with set_defaults(handler=…)
            return int(handler(args))
        if args.command == "agent":
            from villi.cli.daemons import run_agent_command
            return run_agent_command(args)
        if args.command == "operator":
            from villi.cli.daemons import run_operator_command
            return run_operator_command(args)
        if args.command in ("apply", "delete"):
            from villi.cli.resources import apply_command
            return apply_command(args, delete=args.command == "delete")
        if args.command == "get":
            from villi.cli.get import get_command
            return get_command(args)
        if args.command == "status":
            from villi.cli.status import status_command
            return status_command(args)
        if args.command == "kvstoremesh":
            from villi.cli.context import resolve
            from villi.clustermesh.main import run as run_kvstoremesh
            return run_kvstoremesh(args, resolve(args.kvstore).kvstore)
        if args.command == "demo":
            from villi.cli.demo import demo_command
            return demo_command(args)
        if args.command == "cloud-sim":
            from villi.cloudsim.main import run as run_cloudsim
            return run_cloudsim(args)
        if args.command in ("lab", "connectivity"):
            from villi.cli import lab as lab_cli
            return lab_cli.run(args)
        if args.command == "relay":
            from villi.relay.main import run as run_relay
            return run_relay(args)
        if args.command == "ui":
            from villi.ui.main import run as run_ui
            return run_ui(args)
        if args.command == "observe":
            from villi.cli import observe as observe_cli
            return observe_cli.run(args)
        if args.command in ("policy", "bpf", "endpoint", "identity") and \
                _group_usage(ap, args):
            return 2
        if getattr(args, "policyops", None):   # config, endpoint config, datapath/policy
            from villi.cli import policyops
            return policyops.run(args)
    except VilliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
