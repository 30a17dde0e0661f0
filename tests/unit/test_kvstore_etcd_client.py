"""The etcd client's retry rules, without etcd: a fake server that misbehaves on cue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from villi.errors import StoreUnavailable
from villi.kvstore import BackoffPolicy, EtcdStore
from villi.kvstore._gateway import Endpoint


class HangUpServer:
    """Accepts connections, reads the request, then closes without answering: the
    request may or may not have been applied, as when etcd dies mid-request."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.close()
        await writer.wait_closed()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def hang_up() -> AsyncIterator[HangUpServer]:
    fake = HangUpServer()
    fake.server = await asyncio.start_server(fake._handle, "127.0.0.1", 0)
    try:
        yield fake
    finally:
        fake.server.close()
        await fake.server.wait_closed()


async def no_sleep(delay: float) -> None:
    return None


async def test_ambiguous_failures_retry_reads_but_not_transactions(hang_up: HangUpServer) -> None:
    policy = BackoffPolicy(base=0.01, cap=0.01, max_attempts=3)
    async with EtcdStore(hang_up.endpoint, backoff=policy, sleep=no_sleep) as store:
        with pytest.raises(StoreUnavailable, match="unreachable after 3 attempts"):
            await store.get("k")
        assert hang_up.requests == 3  # a read is safe to repeat

        hang_up.requests = 0
        with pytest.raises(StoreUnavailable, match="outcome of /v3/kv/txn unknown"):
            await store.create("k", b"v")
        assert hang_up.requests == 1  # a create-if-absent is not: it may have happened


def test_endpoint_forms() -> None:
    assert Endpoint.parse("127.0.0.1:2379").url == "http://127.0.0.1:2379"
    assert Endpoint.parse("etcd://10.0.0.1:2379/").url == "http://10.0.0.1:2379"
    assert Endpoint.parse("https://e:2379").base == "https://e:2379"
    unix = Endpoint.parse("unix:///run/villi/etcd.sock")
    assert (unix.uds, unix.base) == ("/run/villi/etcd.sock", "http://localhost")
    with pytest.raises(ValueError):
        Endpoint.parse("unix://")
    with pytest.raises(ValueError):
        Endpoint.parse("ftp://x")
    with pytest.raises(ValueError):
        EtcdStore([])


async def test_missing_unix_socket_is_reported_plainly(tmp_path) -> None:
    sock = tmp_path / "absent.sock"
    policy = BackoffPolicy(base=0.01, cap=0.01, max_attempts=2)
    async with EtcdStore(f"unix://{sock}", backoff=policy) as store:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("k")
    assert str(info.value) == (
        f"etcd at unix://{sock} is unreachable after 2 attempts: no such file or directory")
