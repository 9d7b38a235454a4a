"""Every kind of byte source load_car accepts gives the same records, on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from repo_stream import DriverBuilder, MemoryDriver, SourceError, TruncatedCarError, VarintError
from repo_stream.records.writer import build_repo_car

pytestmark = pytest.mark.anyio

RECORDS = [
    ("app.bsky.feed.like/3kaaaaaaaaa2" + str(i), b"\xa1ei\x18" + bytes([i])) for i in range(10)
] + [("app.bsky.actor.profile/self", b"\xa1dname\x63bob")]


@pytest.fixture(scope="module")
def car(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("car") / "repo.car"
    build_repo_car(RECORDS, did="did:plc:sources", rev="3kaaaaaaaaaaa", path=path, order="shuffled")
    return path.read_bytes()


EXPECTED = sorted(RECORDS)


async def collect(source) -> list[tuple[str, bytes]]:
    driver = await DriverBuilder().with_read_size(7).load_car(source)
    assert isinstance(driver, MemoryDriver)
    return [record async for record in driver]


async def test_bytes(car: bytes) -> None:
    assert await collect(car) == EXPECTED
    assert await collect(bytearray(car)) == EXPECTED
    assert await collect(memoryview(car)) == EXPECTED


async def test_anyio_file(car: bytes, tmp_path) -> None:
    path = tmp_path / "repo.car"
    path.write_bytes(car)
    async with await anyio.open_file(path, "rb") as f:
        assert await collect(f) == EXPECTED


async def test_async_iterable_of_uneven_chunks(car: bytes) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        i = 0
        size = 1
        while i < len(car):
            yield car[i : i + size]
            yield b""  # empty chunks mid-stream are not the end
            i += size
            size = size * 2 % 97 + 1

    assert await collect(chunks()) == EXPECTED


async def test_byte_receive_stream_over_tcp(car: bytes) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            for i in range(0, len(car), 100):
                await stream.send(car[i : i + 100])

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            assert await collect(stream) == EXPECTED
        tg.cancel_scope.cancel()


async def test_httpx_aiter_bytes_from_local_server(car: bytes) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ipld.car\r\n"
                f"Content-Length: {len(car)}\r\nConnection: close\r\n\r\n"
            )
            await stream.send(head.encode() + car)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{port}/xrpc/com.atproto.sync.getRepo?did=did:plc:sources"
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                assert await collect(response.aiter_bytes()) == EXPECTED
        tg.cancel_scope.cancel()


async def test_source_errors_are_wrapped(car: bytes) -> None:
    class Broken:
        async def read(self, n: int) -> bytes:
            raise ConnectionResetError("peer went away")

    with pytest.raises(SourceError, match="ConnectionResetError: peer went away") as info:
        await collect(Broken())
    assert isinstance(info.value.__cause__, ConnectionResetError)

    class Text:
        async def read(self, n: int) -> str:
            return "not bytes"

    with pytest.raises(SourceError, match="returned str, expected bytes"):
        await collect(Text())

    with pytest.raises(SourceError, match="unsupported CAR source int"):
        await collect(42)


async def test_source_ending_early_is_truncation(car: bytes) -> None:
    async def half() -> AsyncIterator[bytes]:
        yield car[: len(car) // 2]

    with pytest.raises(TruncatedCarError):
        await collect(half())


async def test_async_generator_source_is_closed_when_loading_fails(car: bytes) -> None:
    closed = []

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield car
            yield b"\x80\x00"  # an overlong varint where the next section would start
            yield car
        finally:
            closed.append(True)

    with pytest.raises(VarintError):
        await collect(chunks())
    assert closed == [True]
