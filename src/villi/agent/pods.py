"""Pod resources this agent knows: labels and named ports by (namespace, name).

``villi apply`` can store a v1 Pod before or after its pod starts. A CNI ADD takes the
Pod's labels and named ports from here; a Pod changed later is handed to
``on_change`` (the endpoint lifecycle re-labels the running endpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PodIndex:
    def __init__(self, on_change: Callable[[str, str, Any], Any] | None = None) -> None:
        self._pods: dict[tuple[str, str], Any] = {}
        self.on_change = on_change

    def on_resource(self, event: Any) -> None:
        """A Pod resource changed (a ``villi.agent.watcher.ResourceEvent``)."""
        key = (event.namespace or "default", event.name)
        if event.model is None:
            self._pods.pop(key, None)
            return
        self._pods[key] = event.model
        if self.on_change is not None:
            self.on_change(key[0], key[1], event.model)

    def labels(self, namespace: str, name: str) -> dict[str, str]:
        pod = self._pods.get((namespace, name))
        return dict(pod.labels) if pod is not None else {}

    def named_ports(self, namespace: str, name: str) -> dict[str, list]:
        """``{name: [port, protocol]}``, as endpoint records keep them."""
        pod = self._pods.get((namespace, name))
        return pod.named_ports() if pod is not None else {}


__all__ = ["PodIndex"]
