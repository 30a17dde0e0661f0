"""Issue 11 §3 / issue 10 §1: what ``villi apply`` accepts as input — alias bombs and
oversized documents refused quickly, ``-f DIR`` and ``-f -`` read as documented."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from villi.cli.resources import load, sources
from villi.errors import ResourceError
from villi.policy import loader
from villi.policy.loader import load_text

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: x}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: y}}}}]}}]
"""


def bomb(levels: int = 9) -> str:
    """The classic "billion laughs": each level refers nine times to the one before."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join(f"*a{i - 1}" for _ in range(9))
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\n" + \
        "spec:\n  " + "\n  ".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly() -> None:
    text = bomb()
    assert len(text) < 1000
    start = time.monotonic()
    with pytest.raises(ResourceError, match="aliases"):
        load_text(text, "bomb.yaml")
    assert time.monotonic() - start < 1.0


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(ResourceError, match="itself|recursive|aliases"):
        load_text("apiVersion: v1\nkind: Namespace\nmetadata: &m {name: x, l: *m}\n", "r.yaml")


def test_modest_aliases_still_work() -> None:
    text = POLICY.format(name="p").replace(
        "endpointSelector: {matchLabels: {app: x}}",
        "endpointSelector: &sel {matchLabels: {app: x}}")
    text = text.replace("ingress: [{fromEndpoints: [{matchLabels: {app: y}}]}]",
                        "ingress: [{fromEndpoints: [*sel]}]")
    (res,) = load_text(text, "ok.yaml")
    assert res.metadata.name == "p"


def test_oversized_document_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_DOCUMENT_BYTES", 200)
    big = POLICY.format(name="big") + "  description: " + "x" * 300 + "\n"
    with pytest.raises(ResourceError, match="more than the limit of 200") as info:
        load_text(big, "big.yaml")
    assert "big.yaml" in str(info.value) and "document 1" in str(info.value)


def test_directory_reads_yaml_yml_json_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(POLICY.format(name="b"))
    (tmp_path / "a.yaml").write_text(POLICY.format(name="a"))
    (tmp_path / "c.json").write_text(
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}}')
    (tmp_path / "notes.txt").write_text("not a resource")
    assert [Path(n).name for n, _ in sources([str(tmp_path)])] == ["a.yaml", "b.yml", "c.json"]
    assert [r.metadata.name for r in load([str(tmp_path)])] == ["a", "b", "c"]


def test_directory_with_a_bad_file_loads_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(name="a"))
    (tmp_path / "z.yaml").write_text("apiVersion: cilium.io/v2\nkind: Nope\n")
    with pytest.raises(ResourceError, match="z.yaml"):
        load([str(tmp_path)])


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="no \\*.yaml"):
        load([str(tmp_path)])


def test_stdin(tmp_path: Path) -> None:
    stdin = io.StringIO(POLICY.format(name="s"))
    (res,) = load(["-"], stdin=stdin)
    assert res.metadata.name == "s"
    with pytest.raises(ResourceError, match="<stdin>"):
        load(["-"], stdin=io.StringIO("kind: [\n"))
