"""A small synchronous client for agents' unix-socket APIs (used by the CLI)."""

from __future__ import annotations

from typing import Any

import httpx

from villi.errors import AgentUnavailable, VilliError


class AgentClient:
    def __init__(self, socket: str, timeout: float = 5.0) -> None:
        self.socket = socket
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=socket),
                                    base_url="http://villi", timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise AgentUnavailable(f"villi agent at {self.socket} is not reachable: {e} "
                                   "(is `villi agent` or `villi lab up` running?)") from e
        if resp.status_code >= 400:
            try:
                msg = resp.json().get("error", resp.text)
            except ValueError:
                msg = resp.text
            raise VilliError(f"agent {self.socket}: {msg}")
        return resp.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
