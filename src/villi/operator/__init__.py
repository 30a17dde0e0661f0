"""The villi operator: pod CIDRs per node and identity GC (see ``docs/ipam.md``).

    from villi.operator import OperatorSettings, run_operator
    await run_operator(store, OperatorSettings(cluster_cidr="10.64.0.0/10"))
"""

from __future__ import annotations

from villi.operator.cidr import ClusterCIDRAllocator, PassResult
from villi.operator.main import Operator, OperatorSettings, run_operator
from villi.operator.subnets import (
    DEFAULT_CLUSTER_CIDR,
    DEFAULT_NODE_MASK,
    RESERVED_RANGES,
    SubnetSpace,
    validate_cluster_cidr,
)

__all__ = [
    "DEFAULT_CLUSTER_CIDR",
    "DEFAULT_NODE_MASK",
    "RESERVED_RANGES",
    "SubnetSpace",
    "ClusterCIDRAllocator",
    "Operator",
    "OperatorSettings",
    "PassResult",
    "run_operator",
    "validate_cluster_cidr",
]
