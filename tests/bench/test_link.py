"""The link emulator (`lazyfs.bench.link`): data arrives intact, delayed and shaped; no byte
before the link could have delivered it.

The time checks are lower bounds implied by the configured link (a shaper that lets data
through faster than its rate is broken), not benchmarks: a slow machine only adds time.
"""

from __future__ import annotations

import contextlib
import functools
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from lazyfs.bench import link as linkemu
from lazyfs.bench.link import LinkSpec, LinkSpecError, parse_link
from lazyfs.fetch.http import HttpRangeReader
from tests.support import nginx
from tests.support.lazyfs_cli import killed_if_left
from tests.support.nginx import NginxServer

StartServer = Callable[[Path], NginxServer]
nginx_server = nginx.nginx_server

MIB = 1024 * 1024


@pytest.fixture
def served(nginx_server: StartServer, tmp_path: Path) -> tuple[NginxServer, bytes]:
    data = random.Random(1).randbytes(4 * MIB)
    (tmp_path / "blob").write_bytes(data)
    return nginx_server(tmp_path), data


def test_serializer_sends_at_its_rate_and_earns_nothing_while_idle() -> None:
    link = linkemu.Serializer(1_000_000)  # 1 MB/s
    assert link.send(10_000, 5.0) == pytest.approx(5.01)  # the first bytes too: no burst
    assert link.send(10_000, 5.0) == pytest.approx(5.02)  # behind them in the queue
    assert link.send(10_000, 5.015) == pytest.approx(5.03)
    # Idle from 5.03 to 9: what comes then leaves at the rate all the same.
    assert link.send(50_000, 9.0) == pytest.approx(9.05)
    with pytest.raises(ValueError):
        linkemu.Serializer(0)


def test_shared_serializer_paces_the_sum() -> None:
    link = linkemu.Serializer(1_000_000)
    # Four connections hand over 10 kB each every 10 ms, together four times the rate.
    last = max(link.send(10_000, step / 100) for step in range(50) for _ in range(4))
    assert last == pytest.approx(2.0)


# -- each byte against the earliest a link could deliver it -------------------------------------

RTT_S = 0.020
RATE_MBIT = 100.0
RATE_BYTES_PER_S = RATE_MBIT * 1_000_000 / 8
EPSILON_S = 1e-9  # float rounding only: the emulator and the client share trio's clock


async def _sizes_server(stream: trio.SocketStream) -> None:
    """Answer each request line `SIZE\\n` with SIZE bytes."""
    pending = b""
    async with stream:
        while data := await stream.receive_some(65536):
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                await stream.send_all(bytes(int(line)))


@contextlib.asynccontextmanager
async def _link(*, aggregate: bool) -> AsyncIterator[int]:
    """A sizes server behind an emulated 20 ms / 100 Mbit/s link, in this trio run: the
    emulator's port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _sizes_server, 0, host="127.0.0.1"))
        target = listeners[0].socket.getsockname()[1]
        yield await nursery.start(functools.partial(
            linkemu.run_link_emulator, "127.0.0.1", 0, "127.0.0.1", target,
            RTT_S * 1000, RATE_MBIT, aggregate=aggregate))
        nursery.cancel_scope.cancel()


async def _receive(stream: trio.SocketStream, size: int,
                   arrived: Callable[[int], None]) -> None:
    """Receive `size` bytes, calling `arrived(n)` as each n arrive."""
    while size:
        data = await stream.receive_some(size)
        assert data
        arrived(len(data))
        size -= len(data)


def _request(size: int) -> bytes:
    return f"{size}\n".encode()


async def _exchange(stream: trio.SocketStream) -> None:
    """One byte asked for and received: the connection's handshake is behind it."""
    await stream.send_all(_request(1))
    await _receive(stream, 1, lambda new: None)


@pytest.mark.network
@pytest.mark.parametrize("aggregate", [True, False])
def test_sequential_requests_take_what_the_link_allows(aggregate: bool) -> None:
    """One connection, one answer after another with the link idle in between (as a start-up
    reading file after file): every byte of an answer arrives no earlier than a round trip
    plus its request's and its own share of the rate after the request was sent."""
    count, size = 25, 150_000
    late_bytes: list[float] = []

    async def main() -> None:
        async with _link(aggregate=aggregate) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                started = trio.current_time()
                paused = 0.0
                for index in range(count):
                    if index % 5 == 4:  # idle a while: the link must earn nothing meanwhile
                        await trio.sleep(0.1)
                        paused += 0.1
                    request = _request(size)
                    sent = trio.current_time()
                    await stream.send_all(request)
                    received = 0

                    def arrived(new: int, sent: float = sent, request: bytes = request) -> None:
                        nonlocal received
                        received += new
                        earliest = sent + RTT_S + (len(request) + received) / RATE_BYTES_PER_S
                        late_bytes.append(trio.current_time() - earliest)

                    await _receive(stream, size, arrived)
                elapsed = trio.current_time() - started - paused
        # 25 answers of 150 kB through 20 ms / 100 Mbit/s: at least 25 * (20 + 12) ms.
        assert elapsed >= count * (RTT_S + size / RATE_BYTES_PER_S)

    trio.run(main)
    assert min(late_bytes) >= -EPSILON_S


@pytest.mark.network
def test_parallel_burst_shares_the_link() -> None:
    """Eight connections ask at once: the bytes of all their answers together arrive no
    faster than the link's rate, from a round trip after the requests."""
    connections, size = 8, 512 * 1024
    late_bytes: list[float] = []

    async def main() -> None:
        async with _link(aggregate=True) as port:
            streams = [await trio.open_tcp_stream("127.0.0.1", port)
                       for _ in range(connections)]
            request = _request(size)
            received = 0

            def arrived(new: int) -> None:
                nonlocal received
                received += new
                # Every request goes up first; the first of them takes its share of the rate.
                earliest = sent + RTT_S + (len(request) + received) / RATE_BYTES_PER_S
                late_bytes.append(trio.current_time() - earliest)

            async def ask(stream: trio.SocketStream) -> None:
                async with stream:
                    await stream.send_all(request)
                    await _receive(stream, size, arrived)

            sent = trio.current_time()
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(ask, stream)
            elapsed = trio.current_time() - sent
            # 4 MiB at 100 Mbit/s take 0.34 s; alone, one connection's would take 42 ms.
            assert elapsed >= RTT_S + connections * size / RATE_BYTES_PER_S
            assert received == connections * size

    trio.run(main)
    assert min(late_bytes) >= -EPSILON_S


@pytest.mark.network
def test_transfer_through_link_is_intact_and_shaped(served: tuple[NginxServer, bytes]) -> None:
    server, data = served

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                linkemu.run_link_emulator, "127.0.0.1", 0, "127.0.0.1", server.port, 20, 16
            )
            started = trio.current_time()
            async with HttpRangeReader(f"http://127.0.0.1:{port}/blob") as reader:
                assert await reader.read(0, len(data)) == data
            # 4 MiB at 16 Mbit/s needs 2.1 s.
            assert trio.current_time() - started >= 1.5
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
def test_sequential_range_requests_take_what_the_link_allows(
    served: tuple[NginxServer, bytes],
) -> None:
    """Range requests of 150 kB one after another over one connection, as a start-up makes
    them: each costs at least a round trip and 12 ms of 100 Mbit/s, however idle the link was
    while its request went up."""
    server, data = served
    count, size = 20, 150_000

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(
                linkemu.run_link_emulator, "127.0.0.1", 0, "127.0.0.1", server.port,
                RTT_S * 1000, RATE_MBIT, aggregate=True))
            async with HttpRangeReader(f"http://127.0.0.1:{port}/blob") as reader:
                assert await reader.read(0, 1) == data[:1]  # connected, the size known
                started = trio.current_time()
                for index in range(count):
                    offset = index * size
                    assert await reader.read(offset, size) == data[offset:offset + size]
                elapsed = trio.current_time() - started
            assert elapsed >= count * (RTT_S + size / RATE_BYTES_PER_S)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
def test_round_trip_delay(served: tuple[NginxServer, bytes]) -> None:
    server, data = served

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                linkemu.run_link_emulator, "127.0.0.1", 0, "127.0.0.1", server.port, 300, 0
            )
            async with httpx.AsyncClient() as client:
                started = trio.current_time()
                first = await client.get(f"http://127.0.0.1:{port}/blob")
                # a new connection: handshake plus request and response, two round trips
                assert trio.current_time() - started >= 0.6
                started = trio.current_time()
                headers = {"Range": "bytes=0-9"}
                second = await client.get(f"http://127.0.0.1:{port}/blob", headers=headers)
                assert trio.current_time() - started >= 0.3  # kept alive: one round trip
            assert first.content == data and second.content == data[:10]
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
def test_aggregate_rate_shared_by_connections(served: tuple[NginxServer, bytes]) -> None:
    server, data = served

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(
                    linkemu.run_link_emulator,
                    "127.0.0.1",
                    0,
                    "127.0.0.1",
                    server.port,
                    2,
                    8,
                    aggregate=True,
                )
            )
            url = f"http://127.0.0.1:{port}/blob"
            started = trio.current_time()
            results: list[bytes] = []

            async def fetch(offset: int) -> None:
                # separate clients: separate connections
                async with httpx.AsyncClient() as client:
                    headers = {"Range": f"bytes={offset}-{offset + MIB - 1}"}
                    results.append((await client.get(url, headers=headers)).content)

            async with trio.open_nursery() as fetches:
                fetches.start_soon(fetch, 0)
                fetches.start_soon(fetch, MIB)
            # 2 MiB at 8 Mbit/s needs 2.1 s; each connection alone would finish in 1.05 s.
            assert trio.current_time() - started >= 1.5
            assert sorted(results) == sorted([data[:MIB], data[MIB : 2 * MIB]])
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
def test_start_link_emulator_subprocess(served: tuple[NginxServer, bytes]) -> None:
    server, data = served
    port, process = linkemu.start_link_emulator(server.port, rtt_ms=2, rate_mbit=0)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/blob", timeout=30)
        assert response.status_code == 200 and response.content == data
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode is not None


@pytest.mark.network
def test_unreachable_target_closes_client_connection() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            unused = nginx.free_port()
            port = await nursery.start(
                linkemu.run_link_emulator, "127.0.0.1", 0, "127.0.0.1", unused, 0, 0
            )
            async with httpx.AsyncClient() as client:
                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    await client.get(f"http://127.0.0.1:{port}/")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--listen", "nohostport", "--target", "127.0.0.1:1"],
        ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--rate-mbit", "-3"],
    ):
        with pytest.raises(SystemExit) as info:
            linkemu.main(argv)
        assert info.value.code == 2
    assert "is not HOST:PORT" in capsys.readouterr().err


def test_parse_link() -> None:
    assert parse_link("20ms,100mbit") == LinkSpec(20.0, 100.0)
    assert parse_link("0.5s, 1.5Gbit/s") == LinkSpec(500.0, 1500.0)
    assert parse_link("300us,800kbit") == LinkSpec(0.3, 0.8)
    assert parse_link("20ms") == LinkSpec(20.0, 0.0)
    assert parse_link("0,0") == LinkSpec(0.0, 0.0)
    assert str(parse_link("20ms,100mbit")) == "20 ms RTT, 100 Mbit/s"
    for bad in ("20", "20ms,100", "fast", "20ms,100mb", "-1ms,1mbit", ""):
        with pytest.raises(LinkSpecError):
            parse_link(bad)


@pytest.mark.network
def test_tied_emulator_ends_with_its_parent(served: tuple[NginxServer, bytes]) -> None:
    """A tied emulator serves until its standard input closes, as it does when the process
    that started it dies, however it dies."""
    server, data = served
    port, process = linkemu.start_link_emulator(server.port, rtt_ms=2, rate_mbit=0, tied=True)
    with killed_if_left(process):
        assert httpx.get(f"http://127.0.0.1:{port}/blob", timeout=30).content == data
        assert process.poll() is None
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=10) == 0


def test_module_runs_standalone() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs.bench.link", "--help"], capture_output=True, text=True,
        timeout=30, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0 and "--rtt-ms" in result.stdout
