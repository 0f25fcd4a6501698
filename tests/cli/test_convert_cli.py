"""`lazyfs convert` as a user runs it: options reach the blob, errors are one line."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from lazyfs.cli import UserError
from lazyfs.cli.convert import ProgressLine
from lazyfs.cli.sizes import parse_size
from tests.cli import assert_one_line_error, run_lazyfs
from tests.support.images import write_oci_image


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "text").write_bytes(b"the quick brown fox\n" * 50_000)
    (root / "sub").mkdir()
    (root / "sub" / "small").write_bytes(b"small")
    os.symlink("../text", root / "sub" / "link")
    return root


def _inspect(blob: Path) -> dict[str, object]:
    result = run_lazyfs("inspect", blob, "--json")
    assert result.returncode == 0, result.stderr
    info: dict[str, object] = json.loads(result.stdout)
    return info


@pytest.mark.parametrize(("text", "size"), [("65536", 65536), ("64K", 65536), ("4M", 4 << 20),
                                            ("1g", 1 << 30), ("64KiB", 65536), (" 7 ", 7)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "4X", "-1", "1.5M", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserError, match="not a size"):
        parse_size(text, "--chunk-size")


def test_convert_defaults_and_summary(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "layer.blob"
    result = run_lazyfs("convert", src, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress line when stderr is not a terminal
    summary = result.stdout
    descriptor = json.loads((tmp_path / "layer.descriptor.json").read_text())
    assert summary.startswith(f"converted directory {src} -> {out}\n")
    for fragment in (descriptor["digest"], descriptor["annotations"]["containerd.io/uncompressed"],
                     "ratio", " of 512.0 KiB, chunk table at",
                     descriptor["annotations"]["dev.containerd.erofs.dmverity.root_digest"],
                     "scan", "write", "encode"):
        assert fragment in summary, fragment
    info = _inspect(out)
    assert info["chunk_size"] == 512 << 10  # lazyfs convert's default, not containerd's
    verity = info["verity"]
    assert isinstance(verity, dict)
    assert (verity["hash"], verity["data_block_size"], verity["salt"]) == ("sha512", 4096, "")


def test_options_reach_the_blob(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "custom.blob"
    result = run_lazyfs("convert", src, "-o", out, "--chunk-size", "64K", "--verity-hash",
                        "sha256", "--salt", "00ff10", "--verity-block-size", "1K",
                        "--zstd-level", "19", "-j", "1")
    assert result.returncode == 0, result.stderr
    info = _inspect(out)
    assert info["chunk_size"] == 65536
    assert info["chunk_count"] == -(-int(info["image_size"]) // 65536)  # type: ignore[call-overload]
    verity = info["verity"]
    assert isinstance(verity, dict)
    assert verity["hash"] == "sha256" and verity["salt"] == "00ff10"
    assert verity["data_block_size"] == verity["hash_block_size"] == 1024
    assert run_lazyfs("verify", out).returncode == 0

    plain = tmp_path / "plain.blob"
    assert run_lazyfs("convert", src, "-o", plain, "--no-verity").returncode == 0
    annotations = json.loads((tmp_path / "plain.descriptor.json").read_text())["annotations"]
    assert not any(key.startswith("dev.containerd.erofs.dmverity") for key in annotations)
    assert _inspect(plain)["verity"] is None


def test_reproducible(tmp_path: Path, src: Path) -> None:
    blobs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.blob"
        assert run_lazyfs("convert", src, "-o", out, "--reproducible").returncode == 0
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1]


@pytest.mark.root
def test_mkfs_options_are_passed_through(tmp_path: Path, src: Path) -> None:
    os.chown(src / "sub" / "small", 1234, 5678)
    out = tmp_path / "layer.blob"
    result = run_lazyfs("convert", src, "-o", out, "--mkfs-opts=--all-root",
                        "--erofs-compression", "lz4hc,12")
    assert result.returncode == 0, result.stderr
    verified = run_lazyfs("verify", out, "--against", src)
    assert verified.returncode == 1
    assert "problem: against: sub/small: owner: expected 1234:5678, found 0:0" in verified.stdout


def test_mkfs_failure_is_one_line_and_leaves_nothing(tmp_path: Path, src: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_lazyfs("convert", src, "-o", out_dir / "x.blob",
                        "--mkfs-opts=--no-such-option")
    assert_one_line_error(result, "mkfs.erofs")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--chunk-size", "4X"], "--chunk-size '4X': not a size"),
        (["--chunk-size", "0"], "--chunk-size 0: must be"),
        (["--chunk-size", "4G"], "--chunk-size 4G: must be"),
        (["--verity-block-size", "3000"], "power of two"),
        (["--salt", "xyz"], "--salt 'xyz': not hexadecimal"),
        (["--salt", "00" * 257], "at most 256"),
        (["--zstd-level", "23"], "--zstd-level 23: must be 1..22"),
        (["--mkfs-opts", "'unbalanced"], "--mkfs-opts"),
        (["--jobs", "-2"], "--jobs -2"),
        (["--erofs-compression", "lz4;rm"], "invalid EROFS compression"),
        (["--erofs-compression", "lz4", "--erofs-layout", "metadata-first"],
         "the metadata-first layout stores file data uncompressed"),
        (["--erofs-writer", "lazyfs", "--erofs-compression", "lz4"],
         "--erofs-compression: only mkfs.erofs builds such images (--erofs-writer mkfs)"),
    ],
)
def test_bad_options_are_one_line(tmp_path: Path, src: Path, args: list[str],
                                  fragment: str) -> None:
    result = run_lazyfs("convert", src, "-o", tmp_path / "x.blob", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.blob").exists()


def test_bad_sources_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_lazyfs("convert", tmp_path / "missing", "-o", tmp_path / "x.blob"),
                          "missing: cannot read source")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01 not a layer" * 100)
    assert_one_line_error(run_lazyfs("convert", junk, "-o", tmp_path / "x.blob"),
                          "not a directory, tar")
    assert_one_line_error(run_lazyfs("convert", tmp_path, "-o", tmp_path / "none" / "x.blob"),
                          "no such directory")


def test_existing_output_needs_force(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "x.blob"
    assert run_lazyfs("convert", src, "-o", out).returncode == 0
    first = out.read_bytes()
    assert_one_line_error(run_lazyfs("convert", src, "-o", out), "exists", "--force")
    assert out.read_bytes() == first
    assert run_lazyfs("convert", src, "-o", out, "--force", "--no-verity").returncode == 0
    assert out.read_bytes() != first
    assert run_lazyfs("verify", out).returncode == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal() -> None:
    stream = _Terminal()
    with ProgressLine(stream) as progress:
        progress.update("mkfs", 0, None)
        progress.update("encode", 0, 1 << 20)
        progress.update("encode", 1 << 20, 1 << 20)
    text = stream.getvalue()
    assert "mkfs     ..." in text
    assert "100.0%" in text and "1.0 MiB / 1.0 MiB" in text
    assert text.endswith("\r\x1b[K")  # the line is cleared at the end
    quiet = io.StringIO()
    with ProgressLine(quiet) as progress:
        progress.update("encode", 5, 10)
    assert quiet.getvalue() == ""


@pytest.mark.root  # the image's tar layers are extracted with their owners
def test_a_whole_image_goes_to_the_image_converter(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    result = run_lazyfs("convert", f"{image.layout}:v1", "--oci-layout", f"{out}:seekable",
                        "--platform", "linux/amd64", "--no-verity", "--chunk-size", "64K")
    assert result.returncode == 0, result.stderr
    digest = result.stdout.strip()
    assert digest.startswith("sha256:")
    index = json.loads((out / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]
    manifest = json.loads((out / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    layer = manifest["layers"][0]
    assert layer["mediaType"] == "application/vnd.erofs.layer.v1+zstd"
    assert "dev.containerd.erofs.dmverity.offset" not in layer["annotations"]
    blob = out / "blobs" / "sha256" / layer["digest"].split(":")[1]
    info = _inspect(blob)  # the layer options reached the layers
    assert info["chunk_size"] == 65536 and info["verity"] is None


@pytest.mark.root  # the image's tar layers are extracted with their owners
def test_image_options_reach_the_conversion(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    result = run_lazyfs("convert", f"{image.layout}:v1", "--oci-layout", f"{out}:renamed",
                        "--platform", "linux/amd64", "--jobs", "1")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    assert [(entry["digest"], entry["annotations"]["org.opencontainers.image.ref.name"])
            for entry in index["manifests"]] == [(result.stdout.strip(), "renamed")]
    assert "lazyfs convert: layer 1/" in result.stderr  # progress lines


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--platform", "linux", "platform 'linux': expected 'os/architecture"),
    ("--creds", "alice", "--creds: expected USER:PASSWORD"),
    ("--push-creds", ":secret", "--push-creds: expected USER:PASSWORD"),
    ("--oci-layout", "{out}:Bad Tag", "OCI layout {out}:Bad Tag: tag 'Bad Tag'"),
])
def test_bad_image_options_are_one_line(tmp_path: Path, option: str, value: str,
                                        fragment: str) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    result = run_lazyfs("convert", f"{image.layout}:v1", "--oci-layout", out,
                        option, value.format(out=out))
    assert_one_line_error(result, fragment.format(out=out))
    assert not out.exists()


def test_layer_and_image_options_do_not_mix(tmp_path: Path, src: Path) -> None:
    image = write_oci_image(tmp_path / "image", "v1")
    assert_one_line_error(run_lazyfs("convert", image.layout, "-o", tmp_path / "x.blob"),
                          "is an image", "--oci-layout")
    assert_one_line_error(run_lazyfs("convert", src, "--oci-layout", tmp_path / "layout"),
                          "--oci-layout: only for a whole image")
    assert_one_line_error(run_lazyfs("convert", src), "give the blob to write: -o OUT")
    assert_one_line_error(run_lazyfs("convert", image.layout), "nothing to write")


def test_startup_order_options_are_one_line(tmp_path: Path, src: Path) -> None:
    from lazyfs.format.prefetch_list import LayerPrefetch, PrefetchList, serialize_prefetch_list

    recorded = tmp_path / "start.json"
    recorded.write_bytes(serialize_prefetch_list(PrefetchList((LayerPrefetch(
        "sha512:" + "0" * 128, 2, (0,), "layer", (0, 3), 4096, 90000),))))
    for args, fragment in (
        (["--startup-order", str(tmp_path / "missing.json")], "No such file"),
        (["--startup-order", str(recorded), "--erofs-compression", "lz4"],
         "as --startup-order needs"),
        (["--startup-order", str(recorded), "--erofs-writer", "mkfs"],
         "only lazyfs's writer lays blocks out in start-up order"),
        (["--startup-order", str(recorded)], "no recorded layer has an image of"),
    ):
        result = run_lazyfs("convert", src, "-o", tmp_path / "x.blob", *args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "x.blob").exists()
