"""The UI's client of the relay's HTTP API (unix socket or http URL)."""

from __future__ import annotations

import json
from typing import Any

import httpx


class RelayClient:
    def __init__(self, address: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if address.startswith("unix://") or address.startswith("/"):
            path = address[len("unix://"):] if address.startswith("unix://") else address
            self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path),
                                             base_url="http://relay", timeout=30,
                                             headers=headers)
        else:
            base = address if "://" in address else f"http://{address}"
            self._client = httpx.AsyncClient(base_url=base, timeout=30, headers=headers)

    async def close(self) -> None:
        await self._client.aclose()

    async def flows(self, params: dict[str, str]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(flows, node_status events) for one query."""
        resp = await self._client.get("/v1/flows", params=params)
        if resp.status_code != 200:
            raise RelayError(resp.status_code, resp.text)
        flows: list[Any] = []
        statuses: list[Any] = []
        for line in resp.text.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            (statuses if "node_status" in item else flows).append(
                item.get("node_status", item))
        return flows, statuses

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        resp = await self._client.get(path, params=params)
        if resp.status_code != 200:
            raise RelayError(resp.status_code, resp.text)
        return resp.json()


class RelayError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"relay answered HTTP {status}: {text[:300]}")
        self.status = status
