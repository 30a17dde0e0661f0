"""Kubernetes ClusterIP services, load-balanced by villi's socket-level datapath.

    models      the ``v1`` Service resource and its validation (``SERVICE_KINDS``)
    allocator   ClusterIP claims in the kvstore (``allocate_cluster_ip``, ``release_cluster_ip``)
    backends    which pods back which service port (pure, incremental)
    table       ``ServiceTable``: what the agent holds; writes LB map diffs

See ``docs/services.md``.
"""
