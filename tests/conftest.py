"""Shared pytest setup: root-only tests skip cleanly when not root."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, eBPF)")
    for item in items:
        if "e2e" in item.keywords or "/e2e/" in str(item.fspath):
            item.add_marker(skip)
