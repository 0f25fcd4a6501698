"""The link emulator: data arrives intact, delayed and shaped.

The time checks are lower bounds implied by the configured link (a shaper that lets data
through faster than its rate is broken), not benchmarks: a slow machine only adds time.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import trio
import trio.testing

from lazyfs.fetch.http import HttpRangeReader
from tests.support import nginx
from tests.support.nginx import NginxServer

StartServer = Callable[[Path], NginxServer]
nginx_server = nginx.nginx_server

MIB = 1024 * 1024


def _load_linkemu() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "tools" / "linkemu.py"
    spec = importlib.util.spec_from_file_location("linkemu", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["linkemu"] = module
    spec.loader.exec_module(module)
    return module


linkemu = _load_linkemu()


@pytest.fixture
def served(nginx_server: StartServer, tmp_path: Path) -> tuple[NginxServer, bytes]:
    data = random.Random(1).randbytes(4 * MIB)
    (tmp_path / "blob").write_bytes(data)
    return nginx_server(tmp_path), data


def test_token_bucket_paces_to_rate() -> None:
    async def main() -> None:
        bucket = linkemu.TokenBucket(1_000_000)  # 1 MB/s, burst of one chunk
        started = trio.current_time()
        await bucket.take(linkemu.CHUNK_BYTES)
        assert trio.current_time() == started  # the burst passes at once
        for _ in range(100):
            await bucket.take(10_000)
        assert trio.current_time() - started == pytest.approx(1.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_shared_token_bucket_paces_the_sum() -> None:
    async def main() -> None:
        bucket = linkemu.TokenBucket(1_000_000)
        await bucket.take(linkemu.CHUNK_BYTES)
        started = trio.current_time()

        async def send(total: int) -> None:
            for _ in range(total // 10_000):
                await bucket.take(10_000)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(send, 500_000)
        assert trio.current_time() - started == pytest.approx(2.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


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


def test_script_runs_standalone() -> None:
    script = Path(linkemu.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "--rtt-ms" in result.stdout
