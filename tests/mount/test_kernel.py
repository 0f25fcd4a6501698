"""EROFS (file-backed and loop), overlay and unmount helpers against the real kernel."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lazyfs.mount import kernel
from lazyfs.mount.kernel import (
    MountBusyError,
    MountError,
    is_mountpoint,
    loops_backed_by,
    overlay_options,
    parse_mountinfo,
)
from lazyfs.mount.state import MountRecord
from tests.support.mounts import cleanup


def test_mountinfo_fields_are_unescaped() -> None:
    text = (
        "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - erofs /dev/loop0 ro\n"
        "37 35 0:40 / /run/x.fuse ro shared:2 - fuse.lazyfs lazyfs ro,user_id=0\n"
        "garbage line\n"
    )
    mounts = parse_mountinfo(text)
    assert [(m.mountpoint, m.fstype, m.source) for m in mounts] == [
        ("/mnt/with space", "erofs", "/dev/loop0"),
        ("/run/x.fuse", "fuse.lazyfs", "lazyfs"),
    ]


def test_overlay_options_put_the_first_lower_dir_on_top() -> None:
    assert overlay_options(["/top", "/bottom"]) == "lowerdir=/top:/bottom"
    assert overlay_options(["/l"], "/u", "/w") == "lowerdir=/l,upperdir=/u,workdir=/w"
    for bad in ([], ["/a:b"], ["/a,b"]):
        with pytest.raises(ValueError):
            overlay_options(bad)
    with pytest.raises(ValueError, match="work directory"):
        overlay_options(["/l"], upperdir="/u")


@pytest.fixture(scope="module")
def erofs_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("erofs")
    (work / "src").mkdir()
    (work / "src" / "hello").write_text("hello\n")
    image = work / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", str(image), str(work / "src")], check=True)
    return image


@pytest.fixture
def work(tmp_path: Path, erofs_image: Path) -> Iterator[Path]:
    """A directory holding a copy of the image and a mountpoint `mnt`; cleaned up after."""
    (tmp_path / "mnt").mkdir()
    (tmp_path / "image.erofs").write_bytes(erofs_image.read_bytes())
    try:
        yield tmp_path
    finally:
        cleanup(mountpoints=[tmp_path], backing_prefixes=[tmp_path])


@pytest.mark.root
def test_file_backed_mount_and_unmount(work: Path) -> None:
    image, mnt = str(work / "image.erofs"), str(work / "mnt")

    async def main() -> None:
        record = await kernel.mount_erofs(image, mnt)
        assert record.loop_device is None  # a kernel that reads files directly
        assert (work / "mnt" / "hello").read_text() == "hello\n"
        with pytest.raises(OSError) as info:
            (work / "mnt" / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        await kernel.unmount(mnt)
        assert not is_mountpoint(mnt)
        await kernel.unmount(mnt)  # nothing mounted is fine

    trio.run(main)


def test_readahead_is_left_alone_off_fuse(tmp_path: Path) -> None:
    """Only a FUSE file system's readahead is raised (never a disk's, under a local image)."""
    image = tmp_path / "image.erofs"
    image.write_bytes(b"\0" * 4096)
    assert kernel.raise_readahead(str(image)) is False


@pytest.mark.root
def test_loop_device_mount_records_and_detaches_its_device(work: Path) -> None:
    image, mnt = str(work / "image.erofs"), str(work / "mnt")
    attached: list[str] = []

    async def main() -> None:
        device = await kernel.mount_erofs_via_loop(image, mnt, attached.append)
        assert attached == [device] and loops_backed_by(str(work)) == [device]
        assert (work / "mnt" / "hello").read_text() == "hello\n"
        # The kernel reads the device ahead far enough for large requests to its file.
        queue = Path("/sys/block", os.path.basename(device), "queue", "read_ahead_kb")
        assert int(queue.read_text()) >= kernel.BLOCK_FILE_READAHEAD_KB
        record = MountRecord(mountpoint=mnt, pid=0, fuse_dir=str(work), block_files=[image])
        await kernel.unmount_kernel_mounts(record, lazy_fallback=False)
        assert not is_mountpoint(mnt) and loops_backed_by(str(work)) == []

    trio.run(main)


@pytest.mark.root
def test_a_bad_image_fails_both_ways_and_leaves_no_loop_device(work: Path) -> None:
    (work / "bad.img").write_bytes(b"\0" * 65536)

    async def main() -> None:
        with pytest.raises(MountError) as info:
            await kernel.mount_erofs(str(work / "bad.img"), str(work / "mnt"))
        assert "file-backed" in str(info.value) and "bad.img" in str(info.value)

    trio.run(main)
    assert loops_backed_by(str(work)) == [] and not is_mountpoint(work / "mnt")


@pytest.mark.root
def test_busy_mount_is_refused_or_detached_lazily(work: Path) -> None:
    image, mnt = str(work / "image.erofs"), str(work / "mnt")

    async def main() -> None:
        await kernel.mount_erofs(image, mnt)
        with open(work / "mnt" / "hello") as busy:
            with pytest.raises(MountBusyError, match="busy"):
                await kernel.unmount(mnt, attempts=2)
            assert is_mountpoint(mnt)
            await kernel.unmount(mnt, attempts=1, lazy_fallback=True)
            assert not is_mountpoint(mnt)
            assert busy.read() == "hello\n"  # open files keep working after a lazy detach

    trio.run(main)


@pytest.mark.root
def test_unrecorded_erofs_mount_of_a_block_file_is_found(work: Path) -> None:
    """What a killed mount(8) leaves behind: mounted, but never written to the record."""
    image, mnt = str(work / "image.erofs"), str(work / "mnt")
    record = MountRecord(mountpoint=mnt, pid=0, fuse_dir=str(work), block_files=[image])

    async def main() -> None:
        await kernel.mount_erofs_file_backed(image, mnt)
        assert kernel.erofs_mounts_of(record) == [mnt]
        await kernel.unmount_kernel_mounts(record, lazy_fallback=False)

    trio.run(main)
    assert not is_mountpoint(mnt)


@pytest.mark.root
def test_overlay_stacks_lower_dirs_read_only(work: Path) -> None:
    top, bottom = work / "top", work / "bottom"
    for directory, files in ((top, {"a": "top"}), (bottom, {"a": "bottom", "b": "bottom"})):
        directory.mkdir()
        for name, text in files.items():
            (directory / name).write_text(text)

    async def main() -> None:
        await kernel.mount_overlay([str(top), str(bottom)], str(work / "mnt"))
        merged = work / "mnt"
        assert sorted(os.listdir(merged)) == ["a", "b"]
        assert (merged / "a").read_text() == "top" and (merged / "b").read_text() == "bottom"
        with pytest.raises(OSError) as info:
            (merged / "c").write_text("x")
        assert info.value.errno == errno.EROFS
        await kernel.unmount(str(merged))

    trio.run(main)
    assert not is_mountpoint(work / "mnt")


@pytest.mark.root
def test_overlay_of_many_layers_names_them_relative_to_their_parent(work: Path) -> None:
    """Absolute paths of 60 long-named layers do not fit in one page of mount options."""
    parent = work / ("layers-" + "x" * 60)
    lowers = []
    for number in range(60):
        lower = parent / f"{number:02d}-{'y' * 40}"
        lower.mkdir(parents=True)
        (lower / f"only-{number}").write_text(str(number))
        (lower / "shared").write_text(str(number))
        lowers.append(str(lower))
    assert len(overlay_options(lowers)) > kernel.MAX_MOUNT_OPTIONS_BYTES

    async def main() -> None:
        await kernel.mount_overlay(lowers, str(work / "mnt"))
        merged = work / "mnt"
        assert len(os.listdir(merged)) == 61
        assert (merged / "shared").read_text() == "0"  # the first is on top
        assert (merged / "only-59").read_text() == "59"
        await kernel.unmount(str(merged))
        scattered = [str(work / f"elsewhere-{n}" / ("z" * 80)) for n in range(60)]
        with pytest.raises(MountError, match="60 layers make"):
            await kernel.mount_overlay(scattered, str(merged))

    trio.run(main)
    assert not is_mountpoint(work / "mnt")


@pytest.mark.root
def test_unmount_kernel_mounts_takes_down_image_overlays_and_layer_mounts(
    work: Path, erofs_image: Path
) -> None:
    """An image record: overlays at its mountpoints (recorded or not), EROFS in layers_dir."""
    from lazyfs.mount.state import ImageRecord

    layers_dir = work / "layers"
    (layers_dir / "0").mkdir(parents=True)
    (layers_dir / "empty").mkdir()
    second = work / "second"
    second.mkdir()
    record = MountRecord(
        mountpoint=str(work / "mnt"), pid=0, fuse_dir=str(work / "none"),
        block_files=[str(work / "image.erofs")], layers_dir=str(layers_dir),
        images=[ImageRecord("r", "sha256:x", "linux/amd64", str(work / "mnt"), ["0"]),
                ImageRecord("r", "sha256:x", "linux/amd64", str(second), ["0"])],
    )  # fmt: skip

    async def main() -> None:
        await kernel.mount_erofs_file_backed(str(work / "image.erofs"), str(layers_dir / "0"))
        for target in (work / "mnt", second):
            lowers = [str(layers_dir / "0"), str(layers_dir / "empty")]
            await kernel.mount_overlay(lowers, str(target))
        assert kernel.overlays_of(record) == [str(second), str(work / "mnt")]
        assert kernel.erofs_mounts_of(record) == [str(layers_dir / "0")]
        await kernel.unmount_kernel_mounts(record, lazy_fallback=False)

    trio.run(main)
    for path in (work / "mnt", second, layers_dir / "0"):
        assert not is_mountpoint(path)
