"""`lazyfs verify IMAGE --against SOURCE` on OCI layouts: a conversion passes, and each forged
variant fails with problems that name the platform, the layer and the path.

The source is a two-platform busybox image (a shared base layer, a second layer per platform
with whiteouts and an opaque directory), converted with `lazyfs convert`. Forgeries rewrite a
copy of the converted layout: index, manifests and configs are written as new blobs and the
tag moved to the new top, so every digest still holds and only the checks of content can tell.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from converter.layer import ConvertOptions, convert_layer
from lazyfs.format import oci
from tests.cli import lazyfs_env, run_lazyfs
from tests.support.images import (
    _Tar,
    base_layer,
    busybox_layers,
    change_layer,
    docker_archive,
    sha256,
    write_image_blobs,
    write_index_image,
    write_oci_image,
)

pytestmark = pytest.mark.root  # converting layers with owners and devices needs root
REF_NAME = "org.opencontainers.image.ref.name"


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.partition(":")[2]


def _json(layout: Path, digest: str) -> Any:
    return json.loads(_blob(layout, digest).read_bytes())


def _put(layout: Path, data: bytes) -> str:
    _blob(layout, sha256(data)).write_bytes(data)
    return sha256(data)


def _put_json(layout: Path, obj: Any, media_type: str) -> dict[str, Any]:
    data = json.dumps(obj).encode()
    return {"mediaType": media_type, "digest": _put(layout, data), "size": len(data)}


class Layout:
    """A copy of a converted layout whose image (`tag`) a test rewrites."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root, self.tag = root, tag
        self.index_file = root / "index.json"

    @property
    def top(self) -> dict[str, Any]:
        entries = json.loads(self.index_file.read_text())["manifests"]
        return next(e for e in entries if e["annotations"][REF_NAME] == self.tag)

    def index(self) -> dict[str, Any]:
        return _json(self.root, self.top["digest"])

    def set_index(self, index: dict[str, Any]) -> None:
        entry = _put_json(self.root, index, oci.OCI_INDEX)
        outer = json.loads(self.index_file.read_text())
        for item in outer["manifests"]:
            if item["annotations"][REF_NAME] == self.tag:
                item.update(entry)
        self.index_file.write_text(json.dumps(outer))

    def edit_image(self, arch: str, edit: Callable[[dict[str, Any], dict[str, Any]], None]
                   ) -> None:
        """Rewrite the manifest and config of `arch` with `edit(manifest, config)`."""
        index = self.index()
        entry = next(e for e in index["manifests"] if e["platform"]["architecture"] == arch)
        manifest = _json(self.root, entry["digest"])
        config = _json(self.root, manifest["config"]["digest"])
        edit(manifest, config)
        manifest["config"] = _put_json(self.root, config, manifest["config"]["mediaType"])
        entry.update(_put_json(self.root, manifest, oci.OCI_MANIFEST))
        self.set_index(index)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source layout, converted layout): `v1` is the busybox index image; the converted
    layout also holds `other`, a conversion of another image."""
    work = tmp_path_factory.mktemp("images")
    source, converted = work / "source", work / "converted"
    write_index_image(source, "v1")
    write_oci_image(source, "other", [base_layer(), change_layer("-other")])
    for tag in ("v1", "other"):
        result = run_lazyfs("convert", f"{source}:{tag}", "--oci-layout", f"{converted}:{tag}",
                            "--reproducible")
        assert result.returncode == 0, result.stderr
    return source, converted


@pytest.fixture
def forged(images: tuple[Path, Path], tmp_path: Path) -> Layout:
    shutil.copytree(images[1], tmp_path / "forged")
    return Layout(tmp_path / "forged", "v1")


def _verify(image: str, source: str) -> tuple[int, list[str], str]:
    result = run_lazyfs("verify", image, "--against", source)
    assert "Traceback" not in result.stderr, result.stderr
    problems = [line.removeprefix("problem: ") for line in result.stdout.splitlines()
                if line.startswith("problem: ")]
    return result.returncode, problems, result.stdout


def test_a_conversion_holds_what_its_source_held(images: tuple[Path, Path]) -> None:
    source, converted = images
    code, problems, out = _verify(f"{converted}:v1", f"{source}:v1")
    assert (code, problems) == (0, []), out
    lines = out.splitlines()
    assert lines[0] == f"verify {converted}:v1 against {source}:v1"
    assert lines[-1] == "OK"
    assert any(line.startswith("  linux/amd64, linux/arm64: layer 1/2 (sha256:") and
               "seekable EROFS" in line and "dm-verity ok" in line for line in lines), out
    for platform in ("linux/amd64", "linux/arm64"):
        assert any(line.startswith(f"  {platform}: each layer holds its source layer's files;")
                   for line in lines), out


def test_alone_a_conversion_is_sound(images: tuple[Path, Path]) -> None:
    result = run_lazyfs("verify", f"{images[1]}:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "OK"


def test_progress_on_a_terminal(images: tuple[Path, Path]) -> None:
    source, converted = images
    master, slave = pty.openpty()
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                return
            if not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lazyfs", "verify", f"{converted}:v1", "--against",
             f"{source}:v1"], stdout=subprocess.PIPE, stderr=slave, env=lazyfs_env(),
            timeout=300, check=False, text=True)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    assert result.returncode == 0, result.stdout
    shown = seen.decode(errors="replace")
    assert "\r" in shown and "layer 1/3 sha256:" in shown and "source layer" in shown, shown
    assert shown.endswith("\x1b[K"), shown  # the line is cleared at the end


def _layer_of(layout: Path, tag: str, number: int) -> dict[str, Any]:
    top = Layout(layout, tag).top
    manifest = _json(layout, top["digest"])
    return dict(manifest["layers"][number - 1])


def test_a_layer_replaced_by_another_images(images: tuple[Path, Path], forged: Layout) -> None:
    other = _layer_of(forged.root, "other", 2)

    def swap(manifest: dict[str, Any], config: dict[str, Any]) -> None:
        manifest["layers"][1] = other

    forged.edit_image("arm64", swap)
    code, problems, out = _verify(f"{forged.root}:v1", f"{images[0]}:v1")
    assert code == 1, out
    where = f"linux/arm64: layer 2/2 ({other['digest'][:19]})"
    assert problems[0].startswith(f"{where}: diff_id: the config lists sha256:"), out
    assert problems[1:] == [
        f"{where}: etc/hostname: size: expected 12, found 14",  # "changed-arm" / "-other"
        f"{where}: etc/motd: size: expected 12, found 14",
        "linux/arm64: root file system: etc/hostname: size: expected 12, found 14",
        "linux/arm64: root file system: etc/motd: size: expected 12, found 14",
    ], out


def test_a_config_whose_diff_ids_are_wrong(images: tuple[Path, Path], forged: Layout) -> None:
    wrong = "sha256:" + "0" * 64

    def lie(manifest: dict[str, Any], config: dict[str, Any]) -> None:
        config["rootfs"]["diff_ids"][0] = wrong

    forged.edit_image("amd64", lie)
    code, problems, out = _verify(f"{forged.root}:v1", f"{images[0]}:v1")
    assert code == 1, out
    assert len(problems) == 1, out
    assert problems[0].startswith("linux/amd64: layer 1/2 (sha256:")
    assert f"diff_id: the config lists {wrong}, the layer unpacks to sha256:" in problems[0]


def test_a_dropped_platform(images: tuple[Path, Path], forged: Layout) -> None:
    index = forged.index()
    index["manifests"] = [e for e in index["manifests"]
                          if e["platform"]["architecture"] != "arm64"]
    forged.set_index(index)
    code, problems, out = _verify(f"{forged.root}:v1", f"{images[0]}:v1")
    assert (code, problems) == (1, ["linux/arm64: in the source, missing from the image"]), out


def test_a_file_changed_in_the_root_file_system(images: tuple[Path, Path], forged: Layout,
                                                tmp_path: Path) -> None:
    """A third layer that changes one file, its diff ID listed as it should be: only the
    root file system tells."""
    tar = tmp_path / "extra.tar"
    tar.write_bytes(_Tar().dir("etc").file("etc/hostname", b"forged\n").bytes())
    result = convert_layer(tar, tmp_path / "extra.blob", ConvertOptions())
    blob = (tmp_path / "extra.blob").read_bytes()
    digest = _put(forged.root, blob)
    descriptor = {"mediaType": oci.EROFS_LAYER_ZSTD, "digest": digest, "size": len(blob),
                  "annotations": result.encoded.annotations.to_annotations()}

    def append(manifest: dict[str, Any], config: dict[str, Any]) -> None:
        manifest["layers"].append(descriptor)
        config["rootfs"]["diff_ids"].append(result.encoded.image_digest)

    forged.edit_image("amd64", append)
    code, problems, out = _verify(f"{forged.root}:v1", f"{images[0]}:v1")
    assert code == 1, out
    assert "linux/amd64: 3 layers, the source has 2" in problems
    changed = [p for p in problems if p.startswith("linux/amd64: root file system: ")]
    assert changed == ["linux/amd64: root file system: etc/hostname: size: expected 8, "
                       "found 7"], out


def _gunzip_tar(data: bytes) -> bytes:
    return zlib.decompress(data, 16 + zlib.MAX_WBITS)


def test_an_image_converted_by_containerd(vectors_dir: Path, tmp_path: Path) -> None:
    """containerd's conversion of the vector's tar layer (whiteouts, an opaque directory,
    hardlinks, xattrs), in an image of its own, against the image of the tar."""
    layer = (vectors_dir / "ctd-tar-whiteouts.tar.gz").read_bytes()
    blob = (vectors_dir / "ctd-tar-whiteouts.blob").read_bytes()
    notes = json.loads((vectors_dir / "ctd-tar-whiteouts.descriptor.json").read_text())
    raw = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    write_image_blobs(tmp_path / "source", "v1", [(oci.OCI_LAYER_GZIP, layer, {})],
                      [sha256(_gunzip_tar(layer))])
    write_image_blobs(tmp_path / "ctd", "v1",
                      [(oci.EROFS_LAYER_ZSTD, blob, notes.get("annotations", {}))],
                      ["sha256:" + hashlib.sha256(raw).hexdigest()])
    code, problems, out = _verify(f"{tmp_path / 'ctd'}:v1", f"{tmp_path / 'source'}:v1")
    assert (code, problems) == (0, []), out


def test_a_docker_archive_source(images: tuple[Path, Path], tmp_path: Path) -> None:
    """A source in another form (a `docker save` archive): the same layers, Docker types."""
    archive = docker_archive(tmp_path / "saved.tar", busybox_layers())
    layout = tmp_path / "converted"
    result = run_lazyfs("convert", str(archive), "--oci-layout", f"{layout}:v1",
                        "--reproducible")
    assert result.returncode == 0, result.stderr
    code, problems, out = _verify(f"{layout}:v1", str(archive))
    assert (code, problems) == (0, []), out


def test_compressed_layers_need_root_to_be_compared() -> None:
    """lazyfs reads uncompressed EROFS itself; a compressed image is mounted, which only root
    may do: without root the image alone still passes (fsck.erofs decodes every file), and a
    comparison says what it could not compare and why."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-test-") as work_dir:
        work = Path(work_dir)
        work.chmod(0o755)
        write_oci_image(work / "source", "v1")
        converted = run_lazyfs("convert", f"{work / 'source'}:v1", "--oci-layout",
                               f"{work / 'converted'}:v1", "--erofs-compression", "lz4hc")
        assert converted.returncode == 0, converted.stderr
        for path in work.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        image, source = f"{work / 'converted'}:v1", f"{work / 'source'}:v1"
        code, problems, out = _verify(image, source)
        assert (code, problems) == (0, []), out
        assert "(mounted read-only)" in out
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

        def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*nobody, sys.executable, "-m", "lazyfs", "verify", *args],
                                  capture_output=True, text=True, timeout=300, check=False,
                                  env=lazyfs_env(TMPDIR="/tmp"))

        alone = as_nobody(image)
        assert alone.returncode == 0, alone.stdout + alone.stderr
        assert "files not read: " in alone.stdout and "only root can mount" in alone.stdout
        against = as_nobody(image, "--against", source)
        assert against.returncode == 1, against.stdout + against.stderr
        problems = [line for line in against.stdout.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1, against.stdout  # the small second layer stays uncompressed
        assert problems[0].startswith("problem: linux/amd64: layer 1/2 (sha256:"), problems
        assert ": its files cannot be compared: " in problems[0]
        assert "only root can mount it" in problems[0]
