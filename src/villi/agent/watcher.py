"""The agent's one watch of applied resources, dispatching each kind to its handler.

``villi apply`` stores every resource under ``villi/resources/<kind>/<ns>/<name>``
(``villi.resources``); the agent follows that prefix once, decodes each change once,
and hands it to the handler registered for its kind (policies → the policy engine,
Namespace → policy and pod identities, Service → the socket LB, Pod → labels and
named ports of running endpoints). A kind nobody registered is logged and skipped; a
resource that does not decode is logged and skipped — neither stops the watch.

New features that follow a resource kind register a handler here (``watch(kind, fn)``)
instead of opening their own watch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from villi import resources
from villi.errors import VilliError
from villi.kvstore import EventType, Store, WatchEvent
from villi.kvstore.sync import PrefixSync

log = logging.getLogger(__name__)

#: The kinds the policy engine consumes (CNP, CCNP, NetworkPolicy).
POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")


@dataclass(frozen=True, slots=True)
class ResourceEvent:
    """One applied resource changed. ``model`` is None when it was deleted;
    ``started`` is when the watch saw it (for the policy regeneration histogram)."""

    kind: str
    namespace: str | None
    name: str
    model: Any | None
    started: float

    @property
    def deleted(self) -> bool:
        return self.model is None


Handler = Callable[[ResourceEvent], None]


class ResourceWatcher:
    """List-then-watch of ``villi/resources/``; one handler list per kind."""

    def __init__(self, store: Store) -> None:
        self.sync = PrefixSync(store, resources.RESOURCES)
        self._handlers: dict[str, list[Handler]] = {}
        self._unhandled: set[str] = set()

    def watch(self, kinds: str | Iterable[str], handler: Handler) -> None:
        """Call ``handler`` for every change of a resource of ``kinds`` (in
        registration order, when several handlers share a kind)."""
        for kind in [kinds] if isinstance(kinds, str) else kinds:
            self._handlers.setdefault(kind, []).append(handler)

    async def run(self) -> None:
        async for event in self.sync:
            self.dispatch(event)

    async def wait_synced(self) -> None:
        await self.sync.synced.wait()

    def dispatch(self, event: WatchEvent) -> None:
        started = time.perf_counter()
        parsed = resources.parse_resource_key(event.key)
        if parsed is None:
            return
        kind, ns, name = parsed
        handlers = self._handlers.get(kind)
        if not handlers:
            if kind not in self._unhandled:
                self._unhandled.add(kind)
                log.warning("no handler for resource kind %s (%s): ignored", kind, event.key)
            return
        try:
            model = None if event.type is EventType.DELETE else \
                resources.decode(event.value, event.key)
            for handler in handlers:
                handler(ResourceEvent(kind, ns, name, model, started))
        except VilliError as e:
            log.error("ignoring resource %s: %s", event.key, e)


__all__ = ["POLICY_KINDS", "ResourceEvent", "ResourceWatcher"]
