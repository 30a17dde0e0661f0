"""The agent's REST API: HTTP over a unix socket (see openapi.yaml beside this file).

Handlers only translate between HTTP and the agent's methods; every rule lives in the
agent. This is the only module that knows HTTP statuses: domain code raises the errors
of ``villi.errors`` and :func:`errors_middleware` maps them (not found → 404, bad
request → 400, address in use → 409, pool exhausted / store / identity → 503 with CNI
code 11 "try again"). Errors leave as ``{"error": message, "code": cni_code}`` so the
CNI plugin can pass the code straight through to the runtime.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml
from aiohttp import web

from villi.errors import (
    AddressInUse,
    BadRequest,
    EndpointError,
    EndpointNotFound,
    IdentityError,
    IPAMError,
    NetnsError,
    PoolExhausted,
    StoreError,
    VilliError,
)

CNI_TRY_AGAIN = 11
API_BACKLOG = 1024


class AgentAPI(Protocol):
    """What the API serves (``villi.agent.daemon.Agent`` implements it)."""

    def health(self) -> dict[str, Any]: ...
    def list_endpoints(self) -> list[dict[str, Any]]: ...
    def get_endpoint(self, ref: str, ifname: str = "eth0") -> dict[str, Any]: ...
    async def create_endpoint(self, req: dict[str, Any]) -> tuple[bool, dict[str, Any]]: ...
    async def delete_endpoint(self, ref: str, ifname: str = "eth0") -> bool: ...
    async def set_endpoint_labels(self, ref: str, ifname: str, labels: dict[str, str]
                                  ) -> dict[str, Any]: ...
    async def ipam_allocate(self, owner: str) -> dict[str, Any]: ...
    async def ipam_release(self, ip: str) -> bool: ...
    def policy_view(self) -> dict[str, Any]: ...
    def identity_view(self) -> list[dict[str, Any]]: ...
    def extra_routes(self) -> list[tuple[str, str, Any]]: ...


class ApiError(VilliError):
    """An HTTP-level error raised by a handler here, with its status and CNI code."""

    def __init__(self, status: int, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error_response(status: int, message: str, code: int) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ApiError as e:
        return _error_response(e.status, str(e), e.code)
    except EndpointNotFound as e:
        return _error_response(404, str(e), 0)
    except BadRequest as e:
        return _error_response(400, str(e), e.cni_code)
    except AddressInUse as e:
        return _error_response(409, str(e), 0)
    except (PoolExhausted, StoreError, IdentityError) as e:
        return _error_response(503, str(e), CNI_TRY_AGAIN)
    except (IPAMError, NetnsError, EndpointError) as e:
        return _error_response(400, str(e), 0)
    except VilliError as e:
        return _error_response(500, str(e), 0)
    except json.JSONDecodeError as e:
        return _error_response(400, f"request body is not JSON: {e}", 6)


def _endpoint_ref(request: web.Request) -> tuple[str, str]:
    return request.match_info["id"], request.query.get("ifname", "eth0")


def build_app(agent: AgentAPI) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/v1/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(agent.health())

    @routes.get("/v1/endpoint")
    async def list_endpoints(request: web.Request) -> web.Response:
        return web.json_response(agent.list_endpoints())

    async def _create(request: web.Request) -> web.Response:
        created, ep = await agent.create_endpoint(await request.json())
        return web.json_response(ep, status=201 if created else 200)

    routes.post("/v1/endpoint")(_create)
    # PUT /v1/endpoint/{id} is Cilium's spelling of the same request; the agent picks ids.
    routes.put("/v1/endpoint/{id:.+}")(_create)

    @routes.get("/v1/endpoint/{id:.+}")
    async def get_endpoint(request: web.Request) -> web.Response:
        return web.json_response(agent.get_endpoint(*_endpoint_ref(request)))

    @routes.patch("/v1/endpoint/{id:.+}")
    async def patch_endpoint(request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("labels"), dict):
            raise ApiError(400, "labels: PATCH body needs a 'labels' object")
        return web.json_response(await agent.set_endpoint_labels(*_endpoint_ref(request),
                                                                 body["labels"]))

    @routes.delete("/v1/endpoint/{id:.+}")
    async def delete_endpoint(request: web.Request) -> web.Response:
        deleted = await agent.delete_endpoint(*_endpoint_ref(request))
        if not deleted:
            raise ApiError(404, f"no endpoint {request.match_info['id']}", 0)
        return web.json_response({"deleted": True})

    @routes.post("/v1/ipam")
    async def ipam_allocate(request: web.Request) -> web.Response:
        owner = request.query.get("owner", "api")
        return web.json_response(await agent.ipam_allocate(owner), status=201)

    @routes.delete("/v1/ipam/{ip}")
    async def ipam_release(request: web.Request) -> web.Response:
        if not await agent.ipam_release(request.match_info["ip"]):
            raise ApiError(404, f"{request.match_info['ip']} is not allocated")
        return web.json_response({"released": True})

    @routes.get("/v1/policy")
    async def policy(request: web.Request) -> web.Response:
        return web.json_response(agent.policy_view())

    @routes.get("/v1/identity")
    async def identity(request: web.Request) -> web.Response:
        return web.json_response(agent.identity_view())

    @routes.get("/v1/openapi.json")
    async def openapi(request: web.Request) -> web.Response:
        text = (resources.files("villi.agent") / "openapi.yaml").read_text()
        return web.json_response(yaml.safe_load(text))

    for extra in agent.extra_routes():
        routes.route(*extra[:2])(extra[2])

    app = web.Application(middlewares=[errors_middleware])
    app.add_routes(routes)
    return app


async def serve_unix(app: web.Application, path: Path) -> web.AppRunner:
    """Serve ``app`` on a unix socket with mode 0600 (root-only, like Cilium's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_socket():
        path.unlink()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # A burst of CNI ADDs (a node full of pods starting at once) queues in the
    # kernel instead of being refused: the default backlog of 128 is too small.
    site = web.UnixSite(runner, str(path), backlog=API_BACKLOG)
    old = os.umask(0o177)
    try:
        await site.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return runner
