"""``GET /v1/policy/cookies``: what each policy-map cookie of this agent names.

Cookies are numbered by each agent's resolver in the order it met the rules, so only
the agent can say which rule a cookie in its pinned policy map stands for; ``villi bpf
policy get`` asks here to print rule names (and prints the numbers when the agent is
down). The route depends on a small protocol, not on the agent class.
"""

from __future__ import annotations

from typing import Any, Protocol

from villi.policy.rules import CookieInfo


class CookieSource(Protocol):
    def cookie_items(self) -> list[tuple[int, CookieInfo]]: ...


def cookie_table(source: CookieSource) -> dict[str, dict[str, Any]]:
    return {str(cookie): {"kind": info.kind, "namespace": info.namespace, "name": info.name,
                          "section": f"{info.direction}[{info.rule_index}]",
                          "spec": info.spec_index}
            for cookie, info in source.cookie_items()}


class _ResolverCookies:
    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def cookie_items(self) -> list[tuple[int, CookieInfo]]:
        return self.agent.policy.resolver.cookies.items()


def policy_debug_routes(agent: Any) -> list[tuple[str, str, Any]]:
    """Routes for the agent's ``extra_routes`` (hook: one line in daemon.py)."""
    source = _ResolverCookies(agent)

    async def cookies(request: Any) -> Any:
        from aiohttp import web

        return web.json_response(cookie_table(source))

    return [("GET", "/v1/policy/cookies", cookies)]
