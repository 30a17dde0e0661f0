"""The LB map writer's slot placement (pure part of villi.datapath.lb)."""

from __future__ import annotations

import random

from villi.datapath.lb import Backend, _place, ip_be, ip_str, port_be, port_host


def b(i: int) -> Backend:
    return Backend(f"10.64.0.{i}", 80)


def test_kept_backends_keep_their_slots_and_new_ones_fill_holes() -> None:
    old = [b(1), b(2), b(3), b(4)]
    assert _place(old, [b(1), b(3), b(4), b(9)]) == [b(1), b(9), b(3), b(4)]
    assert _place(old, [b(1), b(2), b(3), b(4), b(5)]) == old + [b(5)]
    assert _place(old, [b(4), b(1)]) == [b(1), b(4)]       # the tail moves into the hole
    assert _place(old, []) == []
    assert _place([], [b(2), b(1)]) == [b(2), b(1)]


def test_placement_is_always_a_permutation_of_the_wanted_set() -> None:
    rnd = random.Random(3)
    for _ in range(500):
        old = rnd.sample([b(i) for i in range(20)], rnd.randint(0, 12))
        wanted = rnd.sample([b(i) for i in range(20)], rnd.randint(0, 12))
        new = _place(old, wanted)
        assert sorted(new) == sorted(wanted)
        moved = [x for i, x in enumerate(new) if x in old and i < len(old) and old[i] != x]
        holes = len([x for x in old if x not in wanted])
        assert len(moved) <= holes                         # only hole-fillers move


def test_byte_order_helpers() -> None:
    assert ip_str(ip_be("10.32.0.1")) == "10.32.0.1"
    assert port_host(port_be(8080)) == 8080
    assert port_be(0x1234).to_bytes(2, "little") == b"\x12\x34"


def test_lb_flag_matches_c() -> None:
    import re

    from villi.datapath import abi
    from villi.datapath.compiler import BPF_SOURCE_DIR

    text = (BPF_SOURCE_DIR / "lib" / "common.h").read_text()
    m = re.search(r"^#define LB_SVC_F_AFFINITY\s+(0x[0-9a-fA-F]+|\d+)", text, re.M)
    assert m is not None and int(m.group(1), 0) == abi.LB_SVC_F_AFFINITY
