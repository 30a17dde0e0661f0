"""``villi cloud-sim``: run the simulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)

#: Used when no ``--topology`` is given: one type, one /20 subnet.
DEFAULT_TOPOLOGY = {
    "instanceTypes": [{"name": "sim.large", "maxInterfaces": 3, "ipsPerInterface": 10}],
    "subnets": [{"id": "subnet-default", "cidr": "10.70.0.0/20"}],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="HOST:PORT (loopback or a lab namespace; port 0 picks one)")
    p.add_argument("--topology", type=Path,
                   help="JSON file with instanceTypes and subnets (default: one type, "
                   "one /20)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay of every call")
    p.add_argument("--rate-limit", type=float, default=0.0,
                   help="calls per second before RequestLimitExceeded (0: no limit)")
    p.add_argument("--burst", type=float, default=0.0,
                   help="token bucket size (default: one second's worth)")
    p.add_argument("--consistency-delay-ms", type=float, default=0.0,
                   help="how long a new interface stays invisible to Describe")
    p.add_argument("--plumb-links", metavar="BRIDGE",
                   help="lab: attaching an interface to an instance tagged villi.io/netns "
                   "creates a veth on BRIDGE with its peer eni<index> in that namespace")
    p.add_argument("--port-file", type=Path,
                   help="write the bound port here once listening (for the lab)")


def run(args: argparse.Namespace) -> int:
    from villi.cloudsim.model import Cloud
    from villi.cloudsim.server import CloudSimServer, SimSettings, load_topology, serve

    host, _, port_text = str(args.listen).rpartition(":")
    if not host or not port_text.isdigit():
        raise SystemExit(f"--listen: expected HOST:PORT, got {args.listen!r}")
    settings = SimSettings(latency_s=args.latency_ms / 1000, rate_limit=args.rate_limit,
                           burst=args.burst,
                           consistency_delay_s=args.consistency_delay_ms / 1000)
    cloud = Cloud(consistency_delay_s=settings.consistency_delay_s)
    if args.topology is not None:
        try:
            doc = json.loads(args.topology.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{args.topology}: {exc}") from None
        where = str(args.topology)
    else:
        doc, where = DEFAULT_TOPOLOGY, "default topology"
    try:
        load_topology(cloud, doc, where=where)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    async def main() -> None:
        plumber = None
        if args.plumb_links:
            from villi.cloudsim.links import LinkPlumber

            plumber = LinkPlumber(args.plumb_links)
        runner, port = await serve(CloudSimServer(cloud, settings, plumber=plumber), host,
                                   int(port_text))
        log.info("cloud-sim (a simulator, not a cloud) listening on %s:%d", host, port)
        if args.port_file is not None:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(args.port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return 0
