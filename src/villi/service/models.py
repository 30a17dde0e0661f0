"""Service resources (Kubernetes ``v1`` Service). Filled in by the services work;
the mapping exists now so stored resources of every kind decode through one table."""

from __future__ import annotations

from typing import Any

SERVICE_KINDS: dict[tuple[str, str], Any] = {}
