"""TLS for blob readers: one context per setting for the whole process, its CA certificates
loaded once and only when a connection needs them; a server the CAs do not vouch for is
refused, one they do is read."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from lazyfs.fetch.base import ReaderOptions
from lazyfs.fetch.errors import FetchError
from lazyfs.fetch.http import HttpRangeReader
from lazyfs.fetch.tls import LazyCAContext, tls_context
from tests.support.stalling_server import StallingServer

pytestmark = pytest.mark.network
BLOB = bytes(range(256)) * 64


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def serve_https(tmp_path: Path, certificate: tuple[Path, Path]) -> StallingServer:
    (tmp_path / "blob").write_bytes(BLOB)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return StallingServer(tmp_path, tls=context)


def read(url: str, verify: bool | str) -> bytes:
    async def main() -> bytes:
        async with HttpRangeReader(url, ReaderOptions(verify_tls=verify, max_retries=0)) as r:
            return await r.read(100, 1000)

    return trio.run(main)


def test_a_trusted_server_is_read_and_an_untrusted_one_refused(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    with serve_https(tmp_path, certificate) as server:
        assert read(server.url + "blob", str(certificate[0])) == BLOB[100:1100]
        with pytest.raises(FetchError, match="ConnectError"):  # the handshake fails
            read(server.url + "blob", True)
        assert read(server.url + "blob", False) == BLOB[100:1100]


def test_contexts_are_shared_and_trust_nothing_before_they_load(
    certificate: tuple[Path, Path]
) -> None:
    assert tls_context(True) is tls_context(True)
    assert tls_context(str(certificate[0])) is tls_context(str(certificate[0]))
    assert tls_context(False) is False
    fresh = LazyCAContext(ssl.PROTOCOL_TLS_CLIENT)
    fresh._setup(str(certificate[0]), None)
    assert fresh.verify_mode == ssl.CERT_REQUIRED and fresh.check_hostname
    assert fresh.cert_store_stats()["x509_ca"] == 0  # nothing loaded, nothing trusted
    fresh.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1")
    assert fresh.cert_store_stats()["x509_ca"] == 1


def test_a_plain_http_reader_loads_no_certificates(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(BLOB)
    cafile = str(tmp_path / "never-read.pem")  # does not exist: loading it would fail
    with StallingServer(tmp_path) as server:
        assert read(server.url + "blob", cafile) == BLOB[100:1100]
    context = tls_context(cafile)
    assert isinstance(context, LazyCAContext) and context._loader is None


def test_a_process_ending_while_ca_certificates_load_exits_cleanly() -> None:
    """OpenSSL loads the CA certificates without holding the interpreter: a command that fails
    (and exits) right after a client started the load must wait for it, not free the context
    under it (that crashed one exit in seven)."""
    import sys

    script = ("from lazyfs.fetch.tls import tls_context\n"
              "context = tls_context(True)\n"
              "context.start_loading()\n")
    codes = [subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2],
                            capture_output=True, check=False).returncode for _ in range(30)]
    assert codes == [0] * 30


def test_a_registry_client_loads_certificates_only_once_it_sends() -> None:
    """A start that finds its image in the disk cache makes a registry client and sends
    nothing: loading the CA certificates then would only take a core from the start."""
    import sys

    script = (
        "import trio\n"
        "from lazyfs.fetch.registry import RegistryClient\n"
        "from lazyfs.fetch.registry_session import RegistryError\n"
        "from lazyfs.fetch.tls import tls_context\n"
        "async def main():\n"
        "    async with RegistryClient('127.0.0.1:9', insecure=True, retries=0,\n"
        "                              timeout=2) as client:\n"
        "        print(tls_context(True)._loader is None)\n"
        "        try:\n"
        "            await client.get_manifest('a/b', 'latest')\n"
        "        except RegistryError:\n"
        "            pass\n"
        "        print(tls_context(True)._loader is None)\n"
        "trio.run(main)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False"]
