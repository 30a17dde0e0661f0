"""villi's cluster state store: one ``Store`` interface, an etcd and an embedded backend.

    from villi.kvstore import open_store, watch_prefix

    async with open_store("http://127.0.0.1:2379") as store:        # etcd
        ...
    async with open_store("embedded:///var/lib/villi/state.db") as store:  # one node
        ...

See ``docs/kvstore.md`` for the semantics (revisions, watches, leases, compaction),
the key layout and why the etcd backend speaks etcd's JSON gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from villi.kvstore.backoff import Backoff, BackoffPolicy, retry
from villi.kvstore.embedded import EmbeddedStore
from villi.kvstore.etcd import EtcdStore
from villi.kvstore.store import (
    Compacted,
    EventType,
    KeyValue,
    LeaseID,
    ListResult,
    Store,
    TxnOp,
    WatchEvent,
)
from villi.kvstore.sync import LeaseKeeper, PrefixSync, watch_prefix

__all__ = [
    "Backoff",
    "BackoffPolicy",
    "Compacted",
    "EmbeddedStore",
    "EtcdStore",
    "EventType",
    "KeyValue",
    "LeaseID",
    "LeaseKeeper",
    "ListResult",
    "PrefixSync",
    "Store",
    "TxnOp",
    "WatchEvent",
    "open_store",
    "retry",
    "watch_prefix",
]


def open_store(url_or_endpoints: str | Sequence[str], **options: Any) -> Store:
    """The store a URL names; ``options`` go to the backend's constructor.

    - ``memory://`` (or ``memory``): embedded, in memory, this process only.
    - ``embedded:///path/state.db`` or ``file:///path/state.db``: embedded, in a file that
      several processes on this machine may share.
    - ``http://h:p``, ``https://h:p``, ``etcd://h:p``, ``unix:///path/etcd.sock``, a
      comma-separated list of them, or a sequence of them: etcd (several = failover).
    """
    if not isinstance(url_or_endpoints, str):
        return EtcdStore(list(url_or_endpoints), **options)
    url = url_or_endpoints.strip()
    if url in ("memory", "memory://"):
        return EmbeddedStore(None, **options)
    for scheme in ("embedded://", "file://"):
        if url.startswith(scheme):
            path = url[len(scheme):]
            if not path:
                raise ValueError(f"{url!r}: give a file path, e.g. embedded:///var/lib/villi/kv.db")
            return EmbeddedStore(path, **options)
    if url.startswith(("http://", "https://", "etcd://", "unix://")):
        return EtcdStore(url, **options)
    raise ValueError(
        f"unknown kvstore URL {url!r}: expected memory://, embedded:///path, "
        "http://host:port (etcd), unix:///path (etcd) or a comma-separated etcd list")
