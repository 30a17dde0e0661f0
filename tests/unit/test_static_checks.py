"""The static checks of ``make lint`` also run in ``make test`` (CI runs ``make test``):
mypy reports no error in ``src`` and ruff none in ``src``, ``tests`` and ``bench``.
Each is skipped only where the tool is not installed (both are in the ``dev`` extra,
which ``make deps`` installs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.mark.skipif(_tool("mypy") is None, reason="mypy is not installed")
def test_mypy_reports_no_error_in_src() -> None:
    res = subprocess.run([str(_tool("mypy")), "src"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.mark.skipif(_tool("ruff") is None, reason="ruff is not installed")
def test_ruff_is_clean() -> None:
    res = subprocess.run([str(_tool("ruff")), "check", "src", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
