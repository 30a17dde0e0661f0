"""Applied resources in the kvstore: their keys and their encoding.

``villi apply`` validates YAML (``villi.policy.loader``) and stores each resource as
JSON under ``villi/resources/<kind>/<namespace>/<name>`` (``_`` for cluster-wide
ones); agents read them back through :func:`decode`. Both sides go through this module
so the encoding cannot drift.
"""

from __future__ import annotations

import json
from typing import Any

from villi.errors import ResourceError
from villi.kvstore.schema import RESOURCES

CLUSTERWIDE_NS = "_"


def resource_key(kind: str, namespace: str | None, name: str) -> str:
    return f"{RESOURCES}{kind}/{namespace or CLUSTERWIDE_NS}/{name}"


def parse_resource_key(key: str) -> tuple[str, str | None, str] | None:
    """``(kind, namespace, name)`` of a resource key, or None for other keys."""
    if not key.startswith(RESOURCES):
        return None
    parts = key[len(RESOURCES):].split("/")
    if len(parts) != 3:
        return None
    kind, ns, name = parts
    return kind, (None if ns == CLUSTERWIDE_NS else ns), name


def key_of(resource: Any) -> str:
    return resource_key(resource.kind, resource.namespace, resource.metadata.name)


def encode(resource: Any) -> bytes:
    """A validated resource model as stored JSON."""
    data = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    return json.dumps(data, sort_keys=True).encode()


def all_kinds() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) → model, for every resource ``villi apply`` accepts.

    The one registry of resource kinds: the CLI, the lab and the agent's decoder all
    read it; nobody adds kinds to another table at run time. Each package owns its
    models (policy, Service, Pod); this function only lists them."""
    from villi.endpoint.pod import POD_KINDS
    from villi.policy.models import KINDS
    from villi.service.models import SERVICE_KINDS

    return {**KINDS, **SERVICE_KINDS, **POD_KINDS}


def decode(raw: bytes, key: str = "") -> Any:
    """Stored JSON back into its validated model."""
    try:
        data = json.loads(raw)
        model = all_kinds()[(data["apiVersion"], data["kind"])]
    except (ValueError, KeyError, TypeError) as e:
        raise ResourceError(f"stored resource {key} is not a known resource: {e}") from e
    return model.model_validate_json(raw)
