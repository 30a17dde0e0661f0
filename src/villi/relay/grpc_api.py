"""Hubble's ``observer.Observer`` gRPC service over the relay (GetFlows, GetNodes,
ServerStatus), so Hubble's clients and exporters can read villi's flows.

GetFlows: a single whitelist filter is pushed down to the agents (they evaluate it on
raw records); several whitelist filters (OR) and blacklist filters are evaluated by the
relay on the merged flows with villi's dict matcher.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from villi.observer.flowfilter import flow_matches
from villi.relay import convert
from villi.relay.hub import Relay
from villi.relay.proto import observer_pb2, observer_pb2_grpc, relay_pb2

VERSION = "villi/0.1.0"


def _ts_ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


class ObserverService(observer_pb2_grpc.ObserverServicer):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def GetFlows(self, request: observer_pb2.GetFlowsRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            white = [convert.to_spec(f) for f in request.whitelist]
            black = [convert.to_spec(f) for f in request.blacklist]
        except convert.UnsupportedFilter as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        params: dict[str, str] = {}
        if len(white) == 1:
            params["filter"] = json.dumps(white[0].to_json())
        if request.HasField("since"):
            params["since"] = str(_ts_ns(request.since))
        if request.HasField("until"):
            params["until"] = str(_ts_ns(request.until))
        number = request.number or (0 if request.follow or "since" in params else 20)

        def wanted(flow: dict[str, Any]) -> bool:
            if white and not any(flow_matches(s, flow) for s in white):
                return False
            return not any(flow_matches(s, flow) for s in black)

        if request.follow:
            params["last"] = str(number)
            async for item in self.relay.follow(params):
                if "flow" in item:
                    if wanted(item["flow"]):
                        yield _flow_response(item["flow"])
                else:
                    yield _status_response(item["node_status"])
            return
        if request.first:
            params["first"] = str(number)
        elif "since" not in params:
            params["last"] = str(number) if len(white) <= 1 and not black else "100000"
        flows, missing = await self.relay.query(params)
        flows = [f for f in flows if wanted(f)]
        if number:
            flows = flows[:number] if request.first else flows[-number:]
        for flow in flows:
            yield _flow_response(flow)
        for node, err in sorted(missing.items()):
            yield _status_response({"state_change": "NODE_UNAVAILABLE",
                                    "node_names": [node], "message": err})

    async def ServerStatus(self, request: observer_pb2.ServerStatusRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext
                           ) -> observer_pb2.ServerStatusResponse:
        s = await self.relay.status()
        return observer_pb2.ServerStatusResponse(
            num_flows=s["num_flows"], max_flows=s["max_flows"], seen_flows=s["seen_flows"],
            uptime_ns=s["uptime_ns"], version=VERSION, flows_rate=s["flows_rate"],
            num_connected_nodes=wrappers_pb2.UInt32Value(value=s["num_connected_nodes"]),
            num_unavailable_nodes=wrappers_pb2.UInt32Value(value=s["num_unavailable_nodes"]),
            unavailable_nodes=s["unavailable_nodes"])

    async def GetNodes(self, request: observer_pb2.GetNodesRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> observer_pb2.GetNodesResponse:
        s = await self.relay.status()
        return observer_pb2.GetNodesResponse(nodes=[
            observer_pb2.Node(name=n["name"], version=VERSION, address=n["address"],
                              state=relay_pb2.NodeState.Value(n["state"]),
                              uptime_ns=n["uptime_ns"], num_flows=n["num_flows"],
                              max_flows=n["max_flows"], seen_flows=n["seen_flows"])
            for n in s["nodes"]])


def _flow_response(flow: dict[str, Any]) -> observer_pb2.GetFlowsResponse:
    pb = convert.to_proto(flow)
    return observer_pb2.GetFlowsResponse(flow=pb, node_name=pb.node_name, time=pb.time)


def _status_response(status: dict[str, Any]) -> observer_pb2.GetFlowsResponse:
    ev = relay_pb2.NodeStatusEvent(state_change=relay_pb2.NodeState.Value(
        status["state_change"]), node_names=status["node_names"], message=status["message"])
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return observer_pb2.GetFlowsResponse(node_status=ev, time=ts)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        import hmac

        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self.expected):
            return await continuation(details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)


async def start_grpc(relay: Relay, addr: str, token: str | None = None) -> grpc.aio.Server:
    """Serve the Observer service on ``unix:///path`` or ``HOST:PORT`` (plaintext; with
    ``token``, every call must carry it as ``authorization: Bearer …`` metadata)."""
    server = grpc.aio.server(interceptors=[TokenInterceptor(token)] if token else None)
    observer_pb2_grpc.add_ObserverServicer_to_server(ObserverService(relay), server)
    bind = addr if addr.startswith("unix:") else addr
    if server.add_insecure_port(bind) == 0 and not addr.startswith("unix:"):
        raise OSError(f"cannot listen on {addr} for gRPC")
    await server.start()
    return server
