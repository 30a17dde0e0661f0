"""Talking to a lab's agents (unix-socket REST) and to its kvstore."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from villi._nsenter import in_netns
from villi.lab._state import LabError


def agent_call(socket: str, method: str, path: str, timeout: float = 5.0,
               **kw: Any) -> Any:
    """One request to an agent; LabError with the agent's message on failure."""
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket), base_url="http://villi",
                          timeout=timeout) as c:
            resp = c.request(method, path, **kw)
    except httpx.HTTPError as e:
        raise LabError(f"the agent at {socket} does not answer: {e}") from e
    try:
        body = resp.json()
    except ValueError:
        body = {"error": resp.text}
    if resp.status_code >= 400:
        raise LabError(f"agent {socket}: {body.get('error', resp.text)}")
    return body


def healthz(socket: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The agent's health, or None when it does not answer (yet)."""
    try:
        return agent_call(socket, "GET", "/v1/healthz", timeout=timeout)
    except LabError:
        return None


def store_run(state: dict[str, Any], fn: Any) -> Any:
    """Run ``await fn(store)`` against the lab's kvstore, from the namespace that
    reaches it (etcd listens on the underlay only)."""
    from villi.kvstore import open_store

    async def go() -> Any:
        async with open_store(state["kvstore"]) as store:
            return await fn(store)

    with in_netns(state.get("kvstore_netns")):
        return asyncio.run(go())


def node_entries(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node name → its entry in the store (only nodes whose lease is alive)."""
    prefix = "villi/state/nodes/v1/"

    async def fn(store: Any) -> dict[str, dict[str, Any]]:
        res = await store.list(prefix)
        out = {}
        for kv in res.items:
            try:
                out[kv.key[len(prefix):]] = json.loads(kv.value)
            except ValueError:
                continue
        return out

    return store_run(state, fn)


def apply_text(state: dict[str, Any], text: str, *, delete: bool = False,
               filename: str = "<lab>") -> list[str]:
    """Apply (or delete) the resources of a YAML text, as ``villi apply -f`` would."""
    from villi import resources
    from villi.policy.loader import load_text

    items = load_text(text, filename)

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
