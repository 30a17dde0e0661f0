"""The operator gives back ClusterIPs whose Service resource no longer exists."""

from __future__ import annotations

from villi.kvstore import EmbeddedStore
from villi.operator.main import Operator
from villi.service.allocator import allocate_cluster_ip, cluster_ip_of


async def test_orphan_cluster_ip_claims_are_released() -> None:
    store = EmbeddedStore(None)
    try:
        kept = await allocate_cluster_ip(store, "default", "kept", None)
        await allocate_cluster_ip(store, "default", "gone", None)
        await store.put("villi/resources/Service/default/kept", b"{}")
        released = await Operator(store)._cluster_ip_gc()
        assert await cluster_ip_of(store, "default", "gone") is None
        assert await cluster_ip_of(store, "default", "kept") == kept
        assert len(released) == 1 and released[0] != kept
    finally:
        await store.close()
