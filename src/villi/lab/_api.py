"""Talking to a lab's agents (unix-socket REST) and to its kvstore."""

from __future__ import annotations

import asyncio
from typing import Any

from villi._nsenter import in_netns
from villi.agentclient import AgentClient, AgentError
from villi.errors import AgentUnavailable
from villi.lab._state import LabError


def agent_call(socket: str, method: str, path: str, timeout: float = 5.0,
               json_body: Any = None, **kw: Any) -> Any:
    """One request to an agent (``villi.agentclient``); LabError with the agent's
    message on failure."""
    body_in = kw.pop("json", json_body)
    try:
        return AgentClient(socket, timeout).request(method, path, body_in,
                                                    params=kw.pop("params", None))
    except AgentError as e:
        raise LabError(str(e)) from e
    except AgentUnavailable as e:
        raise LabError(f"the agent at {socket} does not answer: {e}") from e


def healthz(socket: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The agent's health, or None when it does not answer (yet)."""
    try:
        return agent_call(socket, "GET", "/v1/healthz", timeout=timeout)
    except LabError:
        return None


def store_run(state: dict[str, Any], fn: Any, quick: bool = False) -> Any:
    """Run ``await fn(store)`` against the lab's kvstore, from the namespace that
    reaches it (etcd listens on the underlay only). ``quick``: give up after ~3 s
    (status displays) instead of the client's default retries."""
    from villi.kvstore import BackoffPolicy, open_store
    from villi.kvstore.tls import KvstoreTLS

    options: dict[str, Any] = {}
    if quick and state.get("kvstore_kind", "etcd") == "etcd":
        options = {"request_timeout": 1.5, "backoff": BackoffPolicy(max_attempts=2)}
    tls = KvstoreTLS.from_dict(state.get("kvstore_tls"))
    if tls is not None:
        options["tls"] = tls

    async def go() -> Any:
        async with open_store(state["kvstore"], **options) as store:
            return await fn(store)

    with in_netns(state.get("kvstore_netns")):
        return asyncio.run(go())


def node_entries(state: dict[str, Any], quick: bool = False) -> dict[str, dict[str, Any]]:
    """Node name → its entry in the store (only nodes whose lease is alive), as the
    JSON of ``villi.kvstore.schema.NodeEntry`` (parsed there, so malformed ones are
    skipped)."""
    from villi.errors import IPAMError
    from villi.kvstore.schema import NODES, NodeEntry

    prefix = NODES

    async def fn(store: Any) -> dict[str, dict[str, Any]]:
        res = await store.list(prefix)
        out = {}
        for kv in res.items:
            try:
                out[kv.key[len(prefix):]] = NodeEntry.decode(kv.value, key=kv.key).to_json()
            except IPAMError:
                continue
        return out

    return store_run(state, fn, quick)


def apply_text(state: dict[str, Any], text: str, *, delete: bool = False,
               filename: str = "<lab>") -> list[str]:
    """Apply (or delete) the resources of a YAML text, as ``villi apply -f`` would."""
    from villi import resources
    from villi.policy.loader import load_text

    items = load_text(text, filename, resources.all_kinds())

    async def fn(store: Any) -> list[str]:
        done = []
        for res in items:
            key = resources.key_of(res)
            if delete:
                await store.delete(key)
            else:
                await store.put(key, resources.encode(res))
            done.append(key)
        return done

    return store_run(state, fn)
