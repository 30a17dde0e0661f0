"""The Python mirror of bpf/lib/common.h matches what clang produces.

Two checks: every struct shared with C has the same size and field offsets in the
BTF of a compiled object as in villi.datapath.abi; every #define of the shared
vocabulary has the same value on both sides.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from villi.datapath import abi
from villi.datapath.compiler import BPF_SOURCE_DIR, NodeConfig, compile_program

pytestmark = pytest.mark.skipif(not shutil.which("clang") or not shutil.which("bpftool"),
                                reason="needs clang and bpftool")

BTF_ONLY = "\n".join(
    ['#include <linux/bpf.h>', '#include <bpf/bpf_helpers.h>', '#include "lib/common.h"']
    + [f"struct {name} __abi_{name} SEC(\".data.abi\");" for name in abi.SHARED_STRUCTS]
    + ['char _license[] SEC("license") = "GPL";']
)


def _btf_structs(obj: Path) -> dict[str, tuple[int, dict[str, int]]]:
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    structs: dict[str, tuple[int, dict[str, int]]] = {}
    current: dict[str, int] | None = None
    for line in out.splitlines():
        m = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if m:
            current = {}
            structs[m.group(1)] = (int(m.group(2)), current)
            continue
        m = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if m and current is not None:
            current[m.group(1)] = int(m.group(2)) // 8
        elif not line.startswith("\t") and not line.startswith(" "):
            current = None
    return structs


def test_struct_layouts_match_btf(tmp_path: Path) -> None:
    obj = compile_program("abi", NodeConfig(), cache_dir=tmp_path, extra_source=BTF_ONLY)
    structs = _btf_structs(obj)
    for name, py in abi.SHARED_STRUCTS.items():
        assert name in structs, f"struct {name} missing from BTF"
        size, fields = structs[name]
        assert ctypes.sizeof(py) == size, f"{name}: C {size} bytes, Python {ctypes.sizeof(py)}"
        for fname, _ in py._fields_:
            assert getattr(py, fname).offset == fields[fname], f"{name}.{fname} offset differs"
    assert abi.FLOW_EVENT_DTYPE.itemsize == structs["flow_event"][0]


def _c_defines() -> dict[str, int]:
    text = (BPF_SOURCE_DIR / "lib" / "common.h").read_text()
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"^#define (\w+)\s+(0x[0-9a-fA-F]+|\d+)", text, re.M)}


def test_vocabulary_matches_c() -> None:
    c = _c_defines()
    for ident in abi.ReservedIdentity:
        assert c[f"ID_{ident.name}"] == ident.value
    for reason in abi.DropReason:
        name = "REASON_FORWARDED" if reason.value == 0 else f"DROP_{reason.name}"
        assert c[name] == reason.value, name
    for ev in abi.EventType:
        assert c[f"EVENT_{ev.name}"] == ev.value
    for obs in abi.ObsPoint:
        assert c[f"OBS_{obs.name}"] == obs.value
    for st in abi.CtState:
        assert c[f"CT_{st.name}"] == st.value
    for mt in abi.MatchType:
        assert c[f"MATCH_{mt.name}"] == mt.value
    for ag in abi.Aggregation:
        assert c[f"AGGREGATION_{ag.name}"] == ag.value
    for mode in abi.Enforcement:
        assert c[f"ENFORCE_{mode.name}"] == mode.value
    for name in ("EP_F_INGRESS_ENFORCED", "EP_F_EGRESS_ENFORCED", "EP_F_INGRESS_LOOKUP",
                 "EP_F_EGRESS_LOOKUP", "EVF_IS_REPLY", "EVF_REDIRECTED",
                 "POLICY_STATIC_PREFIX", "POLICY_FULL_PREFIX", "METRICS_SLOTS", "EP_F_AUDIT",
                 "POLICY_CFG_ENFORCEMENT", "POLICY_CFG_AUDIT", "POLICY_CFG_DEGRADED",
                 "POLICY_CFG_CLUSTER_DEGRADED", "POLICY_CFG_SLOTS"):
        assert c[name] == getattr(abi, name), name
    for reason in abi.DropReason:
        assert reason.value in abi.DROP_REASON_TEXT


def test_reserved_identities_agree_with_identity_package() -> None:
    """The pure identity layer keeps its own copy (it may not import the datapath)."""
    from villi.identity.reserved import ReservedIdentity as Pure

    assert {m.name: m.value for m in Pure} == {m.name: m.value for m in abi.ReservedIdentity}
