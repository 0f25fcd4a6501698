"""tools/linkemu.py, the benchmark scripts' link emulator: a script on top of
`lazyfs.bench.link` (whose behaviour tests/bench/test_link.py checks), still importable by
the scripts and runnable on its own."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lazyfs.bench import link
from tests.support import nginx
from tests.support.nginx import NginxServer
from tools import linkemu

nginx_server = nginx.nginx_server
SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "linkemu.py"


def test_the_script_is_the_package_emulator() -> None:
    assert linkemu.start_link_emulator is link.start_link_emulator
    assert linkemu.run_link_emulator is link.run_link_emulator
    assert linkemu.Serializer is link.Serializer


def test_script_runs_standalone() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "--rtt-ms" in result.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--listen", "nohostport", "--target",
                          "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "is not HOST:PORT" in bad.stderr


@pytest.mark.network
def test_start_link_emulator_from_the_script(nginx_server: object, tmp_path: Path) -> None:
    data = random.Random(2).randbytes(256 * 1024)
    (tmp_path / "blob").write_bytes(data)
    server: NginxServer = nginx_server(tmp_path)  # type: ignore[operator]
    port, process = linkemu.start_link_emulator(server.port, rtt_ms=2, rate_mbit=0)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/blob", timeout=30)
        assert response.status_code == 200 and response.content == data
    finally:
        process.terminate()
        process.wait(timeout=10)
