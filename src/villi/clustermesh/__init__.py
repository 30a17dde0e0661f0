"""ClusterMesh: several clusters, each with its own kvstore, that see each other's pods.

- :mod:`.ids` — cluster names and ids, and Cilium's identity layout (the cluster id in
  identity bits 16–23, or 15–23 with 511 clusters).
- :mod:`.keys` — where a cluster's state, the cached copies of remote clusters, the
  cluster configs and the sync canaries live in a kvstore.
- :mod:`.validate` — every identity, ipcache entry, node and service that comes from a
  remote cluster is checked against that cluster's name and identity range.
- :mod:`.kvstoremesh` — the ``villi kvstoremesh`` process: remote etcds → local cache.
- :mod:`.remote` — the agent's side: follow the cache (or, in ``direct`` mode, every
  remote etcd) into the identity cache, the ipcache, routes and services.

The layer sits between the agent and the packages it wires (identity, kvstore,
service): the agent imports it, it imports nothing of the agent (it talks to the agent
through the small :class:`~villi.clustermesh.remote.MeshSink` protocol).
"""
