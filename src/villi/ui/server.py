"""The UI's web server: the page, its vendored scripts, and a JSON API over the relay.

``/api/flows`` and ``/api/map`` take the same query: ``namespace``, ``pod``, ``label``,
``verdict`` (evaluated by the agents, as villi observe's filters), ``since``/``until``
(epoch seconds; older than the agents' rings comes from their flow export) and
``last``. ``/api/map`` aggregates the flows into the service map (see servicemap.py);
``/api/policy`` returns an applied policy's YAML for the explanation panel.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from villi.ui import servicemap
from villi.ui.relayclient import RelayClient, RelayError

WEB = Path(str(resources.files("villi.ui") / "web"))
VENDOR = {"cytoscape.min.js": WEB / "node_modules" / "cytoscape" / "dist" / "cytoscape.min.js"}
FILTERS = {"namespace": "namespace", "pod": "pod", "label": "label", "verdict": "verdict",
           "from_namespace": "from-namespace", "to_namespace": "to-namespace"}


def relay_params(q: Any) -> dict[str, str]:
    """The page's query → the relay's flow parameters (raises HTTPBadRequest)."""
    preds = []
    for key, field in FILTERS.items():
        values = [v for v in q.getall(key, []) if v]
        if values:
            preds.append({"field": field, "values": values, "negate": False})
    params = {"filter": json.dumps(preds)}
    for key in ("since", "until"):
        if q.get(key):
            try:
                params[key] = str(int(float(q[key]) * 1e9))
            except ValueError:
                raise web.HTTPBadRequest(text=f"{key} must be epoch seconds") from None
    last = q.get("last", "2000")
    if not last.isdigit():
        raise web.HTTPBadRequest(text="last must be a number")
    if "since" not in params:
        params["last"] = last
    return params


def build_app(relay: RelayClient) -> web.Application:
    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB / "index.html")

    async def vendor(request: web.Request) -> web.FileResponse:
        path = VENDOR.get(request.match_info["name"])
        if path is None or not path.exists():
            raise web.HTTPNotFound(text="not vendored: run `make deps` (npm install)")
        return web.FileResponse(path)

    async def flows(request: web.Request) -> web.Response:
        try:
            out, statuses = await relay.flows(relay_params(request.query))
        except RelayError as e:
            return web.json_response({"error": str(e)}, status=502)
        return web.json_response({"flows": out, "node_status": statuses})

    async def service_map(request: web.Request) -> web.Response:
        try:
            out, statuses = await relay.flows(relay_params(request.query))
        except RelayError as e:
            return web.json_response({"error": str(e)}, status=502)
        view = servicemap.build(out, request.query.get("map_namespace") or None)
        return web.json_response({**view, "node_status": statuses, "flows": len(out)})

    async def policy(request: web.Request) -> web.Response:
        try:
            return web.json_response(await relay.get_json("/v1/policy",
                                                          dict(request.query)))
        except RelayError as e:
            return web.json_response({"error": str(e)}, status=e.status)

    async def status(request: web.Request) -> web.Response:
        try:
            return web.json_response(await relay.get_json("/v1/flows/status"))
        except RelayError as e:
            return web.json_response({"error": str(e)}, status=502)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/vendor/{name}", vendor)
    app.router.add_static("/static", WEB / "static")
    app.router.add_get("/api/flows", flows)
    app.router.add_get("/api/map", service_map)
    app.router.add_get("/api/policy", policy)
    app.router.add_get("/api/status", status)

    async def close(app: web.Application) -> None:
        await relay.close()

    app.on_cleanup.append(close)
    return app
