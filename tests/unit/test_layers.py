"""The package layering (pyproject's [tool.importlinter]) holds: lower layers never
import higher ones, so pure policy logic stays testable without the kernel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LINT = Path(sys.executable).parent / "lint-imports"


@pytest.mark.skipif(not LINT.exists() and not shutil.which("lint-imports"),
                    reason="import-linter is not installed")
def test_layers_point_one_way() -> None:
    root = Path(__file__).resolve().parents[2]
    exe = str(LINT) if LINT.exists() else "lint-imports"
    res = subprocess.run([exe], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
