"""Cilium's ENI pool-sizing formulas and the ENI record codecs."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from villi.errors import IPAMError
from villi.ipam.eni import (
    MARKED,
    ENIAgentStatus,
    ENIInterface,
    ENIRecord,
    PoolParams,
    allocation_size,
    excess_ips,
    needed_ips,
    surge,
)


@pytest.mark.parametrize(("params", "available", "used", "want"), [
    (PoolParams(), 0, 0, 8),                       # bootstrap: pre-allocate 8
    (PoolParams(), 8, 3, 3),                       # refill to 8 free
    (PoolParams(), 20, 3, 0),                      # plenty free
    (PoolParams(min_allocate=10), 0, 0, 10),       # min-allocate floor wins
    (PoolParams(min_allocate=10), 12, 11, 7),
    (PoolParams(max_allocate=10), 6, 6, 4),        # capped by max-allocate
    (PoolParams(max_allocate=10), 10, 10, 0),
    (PoolParams(pre_allocate=0), 0, 0, 0),
])
def test_needed(params: PoolParams, available: int, used: int, want: int) -> None:
    assert needed_ips(params, available, used) == want


@pytest.mark.parametrize(("params", "available", "used", "want"), [
    (PoolParams(), 8, 0, 0),          # upper bound 0: not bootstrap -> 8 - 0 - 8 = 0
    (PoolParams(), 30, 2, 20),        # 30 - 2 - 8 - 0
    (PoolParams(), 10, 2, 0),
    (PoolParams(min_allocate=20, max_above_watermark=4), 24, 3, 0),   # <= upper
    (PoolParams(min_allocate=20, max_above_watermark=4), 30, 3, 6),   # bootstrap: 30-24
    (PoolParams(min_allocate=20, max_above_watermark=4), 40, 20, 8),  # 40-20-8-4
])
def test_excess(params: PoolParams, available: int, used: int, want: int) -> None:
    assert excess_ips(params, available, used) == want


def test_release_never_undercuts_the_watermark() -> None:
    p = PoolParams(pre_allocate=8, max_above_watermark=2)
    for available in range(0, 60):
        for used in range(0, available + 1):
            left = available - excess_ips(p, available, used)
            assert needed_ips(p, left, used) == 0 or left == available


def test_allocation_size_and_surge() -> None:
    p = PoolParams(max_above_watermark=2)
    assert surge(8, 20) == 12 and surge(8, 3) == 0
    assert allocation_size(p, 8, 0, room_on_interface=9, free_on_subnet=100) == 9
    assert allocation_size(p, 8, 0, room_on_interface=20, free_on_subnet=100) == 10
    assert allocation_size(p, 8, 30, room_on_interface=49, free_on_subnet=100) == 32
    assert allocation_size(p, 8, 30, room_on_interface=49, free_on_subnet=5) == 5
    with pytest.raises(ValueError, match="pre-allocate"):
        PoolParams(pre_allocate=-1)


def test_record_round_trip_and_errors() -> None:
    rec = ENIRecord("n1", "i-1", "t", 3, 10,
                    (ENIInterface("eni-1", 1, "subnet-a", IPv4Address("10.0.0.4"),
                                  (IPv4Address("10.0.0.5"), IPv4Address("10.0.0.6"))),),
                    {"10.0.0.6": MARKED}, attachable=17, needed=1)
    back = ENIRecord.decode(rec.encode())
    assert back == rec
    assert back.pool() == {IPv4Address("10.0.0.5"): "eni-1", IPv4Address("10.0.0.6"): "eni-1"}
    with pytest.raises(IPAMError, match="k: malformed ENI record"):
        ENIRecord.decode(b'{"node": "n1"}', key="k")
    st = ENIAgentStatus({"10.0.0.5": "pod-a"}, {"10.0.0.6": "ready-for-release"}, 2)
    assert ENIAgentStatus.decode(st.encode()) == st
    with pytest.raises(IPAMError, match="malformed ENI agent status"):
        ENIAgentStatus.decode(b'{"used": []}')
