"""The DNS proxy's line to its node agent (HTTP on the agent's unix socket).

The proxy runs apart from the agent, so this link is allowed to fail: the proxy keeps
the last patterns and DNS rules it fetched and keeps answering; learned IPs it could
not post are posted again once the agent is back (:meth:`DNSProxyService.refresh`).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from villi.identity.labels import LabelSet


class AgentLinkError(Exception):
    pass


class AgentLink:
    def __init__(self, socket_path: str, timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path), timeout=self.timeout)
        try:
            async with self._session.request(method, f"http://agent{path}",
                                             json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise AgentLinkError(f"{method} {path}: {resp.status} "
                                         f"{(data or {}).get('error', '')}")
                return data
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise AgentLinkError(f"{method} {path}: agent unreachable: {e}") from e

    async def patterns(self) -> list[str]:
        return list((await self._call("GET", "/v1/fqdn/patterns"))["patterns"])

    async def dns_rules(self) -> dict[str, list[str]]:
        return dict(await self._call("GET", "/v1/fqdn/dns-rules"))

    async def learned(self, changed: dict[str, LabelSet], removed: list[str]) -> Any:
        body = {"changed": {ip: [str(lbl) for lbl in labels] for ip, labels in changed.items()},
                "removed": removed}
        return await self._call("POST", "/v1/fqdn/learned", body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
