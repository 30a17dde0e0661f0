"""``villi cloud-sim``: a *simulated* cloud provider API for ENI-style IPAM.

Not a cloud: an aiohttp service that behaves like the parts of an EC2-style API that
pod IP management depends on — instance-type limits, subnets that run out, network
interfaces that are created, attached, given secondary IPs, detached and deleted —
with per-call latency, a token-bucket rate limit answering ``RequestLimitExceeded``,
eventual consistency of Describe, and per-action counters at ``/metrics``. The lab
starts it for ``villi lab up --ipam eni``; the operator is its only client (DESIGN.md).

It sits at the level of the agent and operator: nothing in villi imports it except the
CLI that runs it.

The HTTP side (:mod:`villi.cloudsim.server`, aiohttp) is imported only when serving, so
``villi --help`` stays fast.
"""

from __future__ import annotations

from villi.cloudsim.model import ACTIONS, Cloud, InstanceType, SimError

__all__ = ["ACTIONS", "Cloud", "InstanceType", "SimError"]
