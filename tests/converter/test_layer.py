"""Layer conversion end to end: every source kind, checked with `lazyfs verify --against`;
reproducible output; nothing left behind on failure or interruption; no overwriting."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from converter.erofs.writer import ErofsWriter
from converter.errors import ConvertError, UnsafeTarError, UnsupportedSourceError
from converter.layer import ConvertOptions, convert_layer, descriptor_path_for
from converter.mkfs import ErofsLayout, build_erofs
from lazyfs.eager.check import unpack_blob
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED, parse_descriptor
from tests.cli import lazyfs_env, run_lazyfs
from tests.converter import LayerBuilder, rich_layer
from tests.layer.helpers import make_image_bytes
from tests.support.lazyfs_cli import killed_if_left

pytestmark = pytest.mark.root  # tar extraction keeps owners and device nodes; verify mounts

EROFS_MAGIC_AT_1024 = (0xE0F5E1E2).to_bytes(4, "little")


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary space of the conversion, to check that none is left behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def _every_kind_directory(root: Path) -> Path:
    """A directory with every kind of entry mkfs.erofs carries, owners, modes and xattrs."""
    root.mkdir()
    (root / "text.txt").write_bytes(b"lorem ipsum dolor sit amet\n" * 20_000)
    (root / "random.bin").write_bytes(make_image_bytes(700_000, seed=9))
    (root / "empty").write_bytes(b"")
    (root / "hard-a").write_bytes(b"shared inode")
    os.link(root / "hard-a", root / "hard-b")
    (root / "setuid").write_bytes(b"\x7fELF")
    os.chmod(root / "setuid", 0o4755)
    private = root / "private"
    private.mkdir(mode=0o700)
    os.chown(private, 1000, 1001)
    (private / "owned").write_bytes(b"mine")
    os.chown(private / "owned", 4294967294, 70000)
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.symlink("text.txt", root / "rel-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("nowhere", root / "dangling")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(root / "fifo", 0o600)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(root / "sock"))
    os.setxattr(root / "text.txt", "user.comment", b"hello")
    os.setxattr(private, "trusted.overlay.opaque", b"y")
    (root / "n\u00e4me with spaces").write_bytes(b"unicode")
    return root


def _convert(src: Path, out: Path, **options: object) -> None:
    convert_layer(src, out, ConvertOptions(**options))  # type: ignore[arg-type]


def _verify_against(blob: Path, src: Path) -> None:
    result = run_lazyfs("verify", blob, "--against", src)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mounted read-only" in result.stdout
    assert result.stdout.rstrip().endswith("OK")


def test_directory(tmp_path: Path) -> None:
    src = _every_kind_directory(tmp_path / "src")
    out = tmp_path / "layer.blob"
    _convert(src, out)
    _verify_against(out, src)
    # The check can fail: the same blob against a changed tree does.
    (src / "text.txt").write_bytes(b"changed")
    result = run_lazyfs("verify", out, "--against", src)
    assert result.returncode == 1
    assert "problem: against: text.txt: size" in result.stdout


@pytest.mark.parametrize("compression", ["tar", "gzip", "zstd"])
def test_tar_layers(tmp_path: Path, compression: str) -> None:
    layer = rich_layer()
    src = tmp_path / f"layer.{compression}"
    src.write_bytes(getattr(layer, compression)())
    out = tmp_path / "layer.blob"
    phases: list[tuple[str, int, int | None]] = []
    convert_layer(src, out, ConvertOptions(erofs_compression="lz4hc,12"),
                  lambda *event: phases.append(event))
    _verify_against(out, src)
    assert [name for name in dict.fromkeys(p[0] for p in phases)] == ["extract", "mkfs",
                                                                     "encode"]
    assert phases[-1][1] == phases[-1][2]  # encoded the whole image


@pytest.mark.parametrize("writer", list(ErofsWriter), ids=[w.value for w in ErofsWriter])
@pytest.mark.parametrize("source", ["directory", "tar+gzip"])
def test_either_writer(tmp_path: Path, writer: ErofsWriter, source: str) -> None:
    """lazyfs's writer (the default) and mkfs.erofs (`--erofs-writer mkfs`) build the same
    tree, metadata first."""
    if source == "directory":
        src = _every_kind_directory(tmp_path / "src")
    else:
        src = tmp_path / "layer.tar.gz"
        src.write_bytes(rich_layer().gzip())
    out = tmp_path / "layer.blob"
    phases: list[str] = []
    convert_layer(src, out, ConvertOptions(erofs_writer=writer),
                  lambda phase, done, total: phases.append(phase))
    _verify_against(out, src)
    expected = ["scan", "write", "encode"] if writer is ErofsWriter.LAZYFS else [
        "extract", "mkfs", "encode"] if source != "directory" else ["mkfs", "encode"]
    assert list(dict.fromkeys(phases)) == expected


def test_only_mkfs_writes_compressed_and_interleaved_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"data")
    for options in ({"erofs_compression": "lz4"}, {"erofs_layout": ErofsLayout.INTERLEAVED},
                    {"mkfs_opts": ("-x-1",)}):
        with pytest.raises(ConvertError, match=r"only mkfs\.erofs builds such images"):
            _convert(src, tmp_path / "x.blob", erofs_writer=ErofsWriter.LAZYFS, **options)
    _convert(src, tmp_path / "y.blob", erofs_compression="lz4")  # mkfs.erofs, chosen alone


def test_descriptor_beside_blob_records_the_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"data")
    for name, descriptor_name in (("x.blob", "x.descriptor.json"),
                                  ("x.erofs.zst", "x.erofs.zst.descriptor.json")):
        out = tmp_path / name
        _convert(src, out)
        assert descriptor_path_for(out) == tmp_path / descriptor_name
        descriptor = parse_descriptor((tmp_path / descriptor_name).read_bytes())
        data = out.read_bytes()
        assert descriptor.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert descriptor.size == len(data)
        assert descriptor.media_type == "application/vnd.erofs.layer.v1+zstd"
        seekable = descriptor.seekable()
        assert seekable.is_trusted and seekable.root_digest is not None
        raw = tmp_path / f"{name}.raw"
        unpack_blob(out, raw, descriptor)
        image_digest = "sha256:" + hashlib.sha256(raw.read_bytes()).hexdigest()
        assert descriptor.annotations[LABEL_UNCOMPRESSED] == image_digest


def test_raw_erofs_image_is_encoded_as_is(tmp_path: Path) -> None:
    src = _every_kind_directory(tmp_path / "src")
    image = tmp_path / "image.erofs"
    build_erofs(src, image)
    out = tmp_path / "layer.blob"
    result = convert_layer(image, out, ConvertOptions())
    assert result.source_kind.value == "erofs"
    raw = tmp_path / "raw"
    unpack_blob(out, raw, result.descriptor)
    assert raw.read_bytes() == image.read_bytes()
    with pytest.raises(ConvertError, match="already an EROFS image"):
        _convert(image, tmp_path / "other.blob", erofs_compression="lz4")
    with pytest.raises(ConvertError, match="--erofs-layout"):
        _convert(image, tmp_path / "other.blob", erofs_layout=ErofsLayout.INTERLEAVED)
    with pytest.raises(UnsupportedSourceError, match="already a seekable EROFS blob"):
        _convert(out, tmp_path / "again.blob")


def test_reproducible_output_is_byte_identical(tmp_path: Path) -> None:
    src = _every_kind_directory(tmp_path / "src")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True, timeout=60)
    tar = tmp_path / "layer.tar.gz"
    tar.write_bytes(rich_layer().gzip())
    outputs: dict[str, bytes] = {}
    for name, source, reproducible in (("a", src, True), ("b", copy, True), ("c", src, False),
                                       ("d", src, False), ("t1", tar, True),
                                       ("t2", tar, True)):
        out = tmp_path / f"{name}.blob"
        _convert(source, out, reproducible=reproducible)
        outputs[name] = out.read_bytes() + descriptor_path_for(out).read_bytes()
    assert outputs["a"] == outputs["b"]
    assert outputs["t1"] == outputs["t2"]
    assert outputs["c"] != outputs["d"]  # random UUIDs and build times otherwise


def _leftovers(*directories: Path) -> list[Path]:
    return [path for directory in directories for path in directory.iterdir()]


def test_failure_leaves_nothing_behind(tmp_path: Path, private_tmpdir: Path) -> None:
    evil = tmp_path / "evil.tar"
    evil.write_bytes(LayerBuilder().file("ok", b"fine").file("../escape", b"bad").tar())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeTarError, match="escape"):
        _convert(evil, out_dir / "layer.blob")
    broken = tmp_path / "broken.tar.zst"
    broken.write_bytes(rich_layer().zstd()[:-200])
    with pytest.raises(ConvertError):
        _convert(broken, out_dir / "layer.blob")
    assert _leftovers(out_dir, private_tmpdir) == []


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"one")
    out = tmp_path / "layer.blob"
    descriptor = descriptor_path_for(out)
    out.write_bytes(b"precious")
    with pytest.raises(ConvertError, match="exists"):
        _convert(src, out)
    assert out.read_bytes() == b"precious" and not descriptor.exists()
    out.unlink()
    descriptor.write_text("precious")
    with pytest.raises(ConvertError, match="exists"):
        _convert(src, out)
    assert not out.exists() and descriptor.read_text() == "precious"
    _convert(src, out, force=True)
    assert parse_descriptor(descriptor.read_bytes()).size == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.blob", "layer.descriptor.json",
                                                          "scratch", "src"]


def _slow_raw_image(path: Path) -> None:
    """A raw "EROFS image" (by its magic) big enough to take seconds at zstd level 19."""
    data = bytearray(make_image_bytes(48 << 20, seed=5))
    data[:1024] = bytes(1024)
    data[1024:1028] = EROFS_MAGIC_AT_1024
    path.write_bytes(data)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_leaves_nothing_behind(tmp_path: Path, private_tmpdir: Path,
                                         signum: int) -> None:
    image = tmp_path / "image.erofs"
    _slow_raw_image(image)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "lazyfs", "convert", str(image), "-o", str(out_dir / "x.blob"),
         "--zstd-level", "19", "-j", "1"],
        env=lazyfs_env(TMPDIR=str(private_tmpdir)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    with killed_if_left(process):
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".x.blob.") for p in out_dir.iterdir()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "lazyfs: interrupted"
    assert _leftovers(out_dir, private_tmpdir) == []
