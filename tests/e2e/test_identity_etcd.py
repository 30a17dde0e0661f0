"""Issue 3 acceptance: concurrent identity allocation from two processes yields one id.

Two OS processes (two "nodes") allocate identities for the same label sets at the same
moment against a real etcd; for every label set both must get the same number.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from villi.testing.etcd import EtcdServer

pytestmark = [pytest.mark.e2e, pytest.mark.etcd,
              pytest.mark.skipif(not shutil.which("etcd"), reason="needs etcd")]

ALLOCATOR = """
import asyncio, json, sys, time
from villi.identity.allocator import IdentityAllocator
from villi.identity.labels import pod_identity_labels
from villi.kvstore import open_store

async def main(url, node, start_at):
    async with open_store(url) as store:
        alloc = IdentityAllocator(store, node)
        sets = [pod_identity_labels("ns", {"app": f"a{i}"}) for i in range(20)]
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        ids = await asyncio.gather(*(alloc.allocate(s) for s in sets))
        print(json.dumps([int(i) for i in ids]))

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def test_two_processes_allocate_the_same_identities() -> None:
    with EtcdServer() as etcd:
        start_at = time.time() + 2.0
        procs = [subprocess.Popen([sys.executable, "-c", ALLOCATOR, etcd.endpoint, node,
                                   str(start_at)], stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ))
                 for node in ("node-a", "node-b")]
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            outs.append(json.loads(out))
    assert outs[0] == outs[1]
    assert len(set(outs[0])) == 20 and min(outs[0]) >= 256
