"""`lazyfs mount IMAGE_REF MOUNTPOINT` against Debian's docker-registry on 127.0.0.1: images
built from busybox-static, pushed with skopeo, converted with `lazyfs convert --push`, mounted
through the CLI as overlays of per-layer EROFS mounts, compared with the tree the layers mean.

Every test takes down its mounts, loop devices and daemons in `finally` (the `lazyfs` fixture)
and checks that `umount` left nothing in /proc/self/mountinfo or `losetup -a`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from converter.tree import compare_trees, scan_directory
from tests.support import registry_images
from tests.support.images import (
    base_layer,
    change_layer,
    expected_rootfs_tree,
    ghost_layer,
    write_index_image,
)
from tests.support.lazyfs_cli import Lazyfs, pid_gone, wait_until
from tests.support.registry import (
    Registry,
    htpasswd_auth,
    redirecting_front_end,
    running_registry,
    token_registry,
)
from tests.support.registry_images import (
    PublishedImage,
    assert_nothing_left,
    publish,
)

pytestmark = [pytest.mark.root, pytest.mark.network]

INSECURE = "--insecure-registry"

registry = registry_images.registry
busybox = registry_images.busybox


def directories(tmp_path: Path, *names: str) -> list[Path]:
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.mkdir()
    return paths


def mount_image(lazyfs: Lazyfs, *args: str, mountpoints: list[Path]) -> tuple[str, dict[str, Any]]:
    """Mount through the CLI; return (stdout, the mount record). Cleanup is registered first."""
    lazyfs.mountpoints.extend(mountpoints)
    result = lazyfs.run("mount", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    record = lazyfs.record(mountpoints[0])
    assert record is not None and record["ready"]
    lazyfs.pids.append(record["pid"])
    return result.stdout, record


def umount_leaves_nothing(lazyfs: Lazyfs, path: Path, record: dict[str, Any]) -> None:
    result = lazyfs.run("umount", str(path))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: pid_gone(record["pid"]), "the daemon to exit")
    assert lazyfs.records() == []
    for image in record["images"]:
        assert_nothing_left(Path(image["mountpoint"]))
    assert_nothing_left(lazyfs.state_dir)
    assert not os.path.exists(record["layers_dir"]) and not os.path.exists(record["fuse_dir"])


def one_line_error(result: Any, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


# -- the image as a root file system ------------------------------------------------------------


def test_mount_shows_the_rootfs_read_only_and_umount_leaves_nothing(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    (mountpoint,) = directories(tmp_path, "mnt")
    stdout, record = mount_image(
        lazyfs, busybox.converted, str(mountpoint), INSECURE, mountpoints=[mountpoint]
    )
    (image,) = record["images"]
    assert stdout == (
        f"{mountpoint}: {busybox.converted}@{image['manifest_digest']} (linux/amd64, 2 layers)\n"
    )
    assert compare_trees(expected_rootfs_tree(busybox.layers), scan_directory(mountpoint)) == []
    assert (mountpoint / "etc" / "hostname").read_text() == "changed\n"  # modified
    assert not (mountpoint / "etc" / "os-release").exists()  # whiteout
    assert not (mountpoint / "var" / "log").exists()  # whiteout of a directory
    assert os.listdir(mountpoint / "var" / "cache" / "app") == ["fresh.txt"]  # opaque
    with pytest.raises(OSError) as refused:
        (mountpoint / "etc" / "new").write_text("x")
    assert refused.value.errno == errno.EROFS

    listed = lazyfs.run("mounts").stdout
    assert f"{busybox.converted}@{image['manifest_digest']}" in listed and "mounted" in listed
    stats = lazyfs.run("stats", str(mountpoint))
    assert stats.returncode == 0, stats.stderr
    assert image["manifest_digest"] in stats.stdout
    for name in image["layers"]:
        assert f"layer {name} (" in stats.stdout
    raw = json.loads(lazyfs.run("stats", str(mountpoint), "--json").stdout)
    assert sorted(raw["layers"]) == sorted(image["layers"])
    # The whole tree was read: every chunk of every layer.
    for layer in raw["layers"].values():
        assert layer["chunks_fetched"] == layer["chunk_count"] >= 1, layer
    umount_leaves_nothing(lazyfs, mountpoint, record)


def test_writable_mount_keeps_changes_in_the_upper_directory(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    mountpoint, changes = directories(tmp_path, "mnt", "changes")
    _, record = mount_image(
        lazyfs, busybox.converted, str(mountpoint), INSECURE, "--writable", str(changes),
        mountpoints=[mountpoint],
    )  # fmt: skip
    (mountpoint / "etc" / "hostname").write_text("mine\n")
    (mountpoint / "bin" / "busybox").unlink()
    assert (changes / "upper" / "etc" / "hostname").read_text() == "mine\n"
    umount_leaves_nothing(lazyfs, mountpoint, record)
    assert (changes / "upper" / "etc" / "hostname").read_text() == "mine\n"
    assert (changes / "upper" / "bin" / "busybox").is_char_device()  # overlay's whiteout


def test_images_mounted_together_share_layers_and_a_repeated_layer_is_mounted_once(
    lazyfs: Lazyfs, registry: Registry, busybox: PublishedImage, tmp_path: Path
) -> None:
    repeated = [base_layer(), change_layer("-b"), base_layer()]
    other = publish(tmp_path / "work", registry.host, layers=repeated, repository="test/again")
    first, second = directories(tmp_path, "first", "second")
    stdout, record = mount_image(
        lazyfs, busybox.converted, str(first), other.converted, str(second), INSECURE,
        mountpoints=[first, second],
    )  # fmt: skip
    assert len(stdout.splitlines()) == 2 and "3 layers" in stdout.splitlines()[1]
    # base (shared, converted reproducibly to the same blob), busybox's change, the other's
    assert len(record["sources"]) == 3
    mine, theirs = record["images"]
    assert theirs["layers"][0] == theirs["layers"][2] == mine["layers"][0]
    assert len(record["erofs_mounts"]) == 3
    assert compare_trees(expected_rootfs_tree(busybox.layers), scan_directory(first)) == []
    assert compare_trees(expected_rootfs_tree(repeated), scan_directory(second)) == []
    assert (second / "etc" / "os-release").exists()  # the base layer again, on top
    assert theirs["mountpoint"] == str(second)
    listed = lazyfs.run("mounts").stdout
    assert str(first) in listed and str(second) in listed
    assert lazyfs.run("stats", str(second)).returncode == 0
    umount_leaves_nothing(lazyfs, second, record)  # either mountpoint takes down both


def test_block_only_exposes_every_layer_of_the_image(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    (blocks,) = directories(tmp_path, "blocks")
    _, record = mount_image(
        lazyfs, busybox.converted, INSECURE, "--block-only", str(blocks), mountpoints=[blocks]
    )
    names = sorted(os.path.basename(path) for path in record["block_files"])
    assert len(names) == 2 and sorted(os.listdir(blocks)) == [".lazyfs-stats.json", *names]
    assert record["images"] == [] and record["erofs_mounts"] == []
    for name in names:
        assert (blocks / name).read_bytes()[1024:1028] == b"\xe2\xe1\xf5\xe0"  # EROFS magic
    one_line_error(
        lazyfs.run("mount", busybox.converted, INSECURE, "--block-only", str(blocks),
                   "--writable", str(tmp_path / "w")),
        "not with --block-only",
    )  # fmt: skip
    result = lazyfs.run("umount", str(blocks))
    assert result.returncode == 0, result.stderr
    assert_nothing_left(blocks, lazyfs.state_dir)
    assert os.listdir(blocks) == []


def test_an_image_of_one_layer(lazyfs: Lazyfs, registry: Registry, tmp_path: Path) -> None:
    single = publish(tmp_path / "work", registry.host, layers=[base_layer()], repository="t/one")
    (mountpoint,) = directories(tmp_path, "mnt")
    stdout, record = mount_image(
        lazyfs, single.converted, str(mountpoint), INSECURE, mountpoints=[mountpoint]
    )
    assert stdout.endswith("(linux/amd64, 1 layer)\n")
    assert compare_trees(expected_rootfs_tree(single.layers), scan_directory(mountpoint)) == []
    umount_leaves_nothing(lazyfs, mountpoint, record)


def test_whiteouts_of_names_no_layer_has_stay_hidden(
    lazyfs: Lazyfs, registry: Registry, tmp_path: Path
) -> None:
    """A layer that whites out names no lower layer holds, in a directory of its own: the
    merged tree hides them whether that layer is the only one, the bottom or the top (an
    unmarked directory of one layer would list them as unreadable `c?????????` entries)."""
    only = publish(tmp_path / "work", registry.host, layers=[ghost_layer()],
                   repository="t/ghost-only")
    stacked = publish(tmp_path / "work", registry.host,
                      layers=[ghost_layer(), base_layer(), ghost_layer("newer")],
                      repository="t/ghost-stacked")
    first, second = directories(tmp_path, "only", "stacked")
    _, record = mount_image(
        lazyfs, only.converted, str(first), stacked.converted, str(second), INSECURE,
        mountpoints=[first, second],
    )  # fmt: skip
    assert os.listdir(first / "fresh") == ["real"]
    assert os.listdir(second / "fresh") == ["real"]  # the bottom layer's directory
    assert os.listdir(second / "newer") == ["real"]  # the top layer's directory
    for mountpoint in (first, second):
        assert not [name for name in os.listdir(mountpoint) if name.startswith("phantom")]
    assert compare_trees(expected_rootfs_tree(only.layers), scan_directory(first)) == []
    assert compare_trees(expected_rootfs_tree(stacked.layers), scan_directory(second)) == []
    umount_leaves_nothing(lazyfs, first, record)


def test_platform_is_picked_from_an_index(
    lazyfs: Lazyfs, registry: Registry, tmp_path: Path
) -> None:
    from tests.support.images import skopeo_push
    from tests.support.registry_images import convert_push

    image = write_index_image(tmp_path / "layout", "v1")
    skopeo_push(image.layout, "v1", registry.host, "test/multi:v1", all_platforms=True)
    reference = f"{registry.host}/test/multi:v1-erofs"
    convert_push(f"{registry.host}/test/multi:v1", reference)
    amd64, arm64, elsewhere = directories(tmp_path, "amd64", "arm64", "elsewhere")
    stdout, record = mount_image(
        lazyfs, reference, str(amd64), INSECURE, mountpoints=[amd64]
    )
    assert "(linux/amd64, 2 layers)" in stdout
    assert (amd64 / "etc" / "hostname").read_text() == "changed\n"
    umount_leaves_nothing(lazyfs, amd64, record)

    stdout, record = mount_image(
        lazyfs, reference, str(arm64), INSECURE, "--platform", "linux/arm64",
        mountpoints=[arm64],
    )  # fmt: skip
    assert "(linux/arm64, 2 layers)" in stdout
    assert (arm64 / "etc" / "hostname").read_text() == "changed-arm\n"
    umount_leaves_nothing(lazyfs, arm64, record)

    refused = lazyfs.run("mount", reference, str(elsewhere), INSECURE, "--platform", "linux/s390x")
    one_line_error(refused, "no manifest for platform linux/s390x", "linux/arm64")


# -- refusals -------------------------------------------------------------------------------------


def test_unconverted_image_and_missing_tag_fail_in_one_line(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    (mountpoint,) = directories(tmp_path, "mnt")
    lazyfs.mountpoints.append(mountpoint)
    unconverted = lazyfs.run("mount", busybox.original, str(mountpoint), INSECURE)
    one_line_error(unconverted, "layer 1 of 2 (sha256:", "not a seekable EROFS layer",
                   f"lazyfs convert {busybox.original} --push")
    missing = lazyfs.run("mount", f"{busybox.host}/test/busybox:nope", str(mountpoint), INSECURE)
    one_line_error(missing, "test/busybox:nope", "not found")
    plain_http = lazyfs.run("mount", busybox.converted, str(mountpoint))
    one_line_error(plain_http, "insecure")
    for args, message in (
        ([busybox.converted], "give a MOUNTPOINT"),
        ([busybox.converted, str(mountpoint), "--header", "A: b"], "--header applies to layer"),
        ([busybox.converted, str(mountpoint), "--platform", "linux"], "--platform"),
        ([busybox.converted, str(mountpoint), "--creds", "nocolon"], "USER:PASSWORD"),
    ):
        one_line_error(lazyfs.run("mount", *args, INSECURE), message)
    assert lazyfs.records() == []
    assert_nothing_left(mountpoint, lazyfs.state_dir)


def test_umount_cleans_up_after_a_killed_daemon(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    (mountpoint,) = directories(tmp_path, "mnt")
    _, record = mount_image(
        lazyfs, busybox.converted, str(mountpoint), INSECURE, mountpoints=[mountpoint]
    )
    assert (mountpoint / "etc" / "passwd").read_bytes().startswith(b"root:")
    os.kill(record["pid"], signal.SIGKILL)
    wait_until(lambda: pid_gone(record["pid"]), "the daemon to die")
    assert "dead" in lazyfs.run("mounts").stdout
    umount_leaves_nothing(lazyfs, mountpoint, record)


# -- registries with credentials, a CDN, a mirror -------------------------------------------------


@pytest.mark.slow
def test_basic_auth_registry_with_credentials_and_docker_config(
    lazyfs: Lazyfs, tmp_path: Path
) -> None:
    auth = htpasswd_auth(tmp_path / "auth", {"alice": "secret"})
    with running_registry(tmp_path / "registry", auth) as registry:
        image = publish(tmp_path / "work", registry.host, creds="alice:secret")
        (mountpoint,) = directories(tmp_path, "mnt")
        lazyfs.mountpoints.append(mountpoint)
        wrong = lazyfs.run("mount", image.converted, str(mountpoint), INSECURE,
                           "--creds", "alice:wrong")
        one_line_error(wrong, "'alice'", "refused")
        anonymous = lazyfs.run("mount", image.converted, str(mountpoint), INSECURE)
        one_line_error(anonymous, "authentication required")

        _, record = mount_image(lazyfs, image.converted, str(mountpoint), INSECURE,
                                "--creds", "alice:secret", mountpoints=[mountpoint])
        assert compare_trees(expected_rootfs_tree(image.layers), scan_directory(mountpoint)) == []
        umount_leaves_nothing(lazyfs, mountpoint, record)

        config = tmp_path / "docker"
        config.mkdir()
        token = base64.b64encode(b"alice:secret").decode()
        (config / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
        lazyfs.env["DOCKER_CONFIG"] = str(config)
        _, record = mount_image(lazyfs, image.converted, str(mountpoint), INSECURE,
                                mountpoints=[mountpoint])
        assert (mountpoint / "etc" / "hostname").read_text() == "changed\n"
        umount_leaves_nothing(lazyfs, mountpoint, record)


@pytest.mark.slow
def test_token_registry_with_credentials(lazyfs: Lazyfs, tmp_path: Path) -> None:
    with token_registry(tmp_path / "token", {"bob": "hunter2"}) as (registry, tokens):
        image = publish(tmp_path / "work", registry.host, creds="bob:hunter2")
        (mountpoint,) = directories(tmp_path, "mnt")
        lazyfs.mountpoints.append(mountpoint)
        wrong = lazyfs.run("mount", image.converted, str(mountpoint), INSECURE,
                           "--creds", "bob:wrong")
        one_line_error(wrong, "token server", "refused", "'bob'")

        before = len(tokens.requests)
        _, record = mount_image(lazyfs, image.converted, str(mountpoint), INSECURE,
                                "--creds", "bob:hunter2", mountpoints=[mountpoint])
        assert compare_trees(expected_rootfs_tree(image.layers), scan_directory(mountpoint)) == []
        issued = tokens.requests[before:]
        assert issued and all(r["ok"] and r["account"] == "bob" for r in issued)
        umount_leaves_nothing(lazyfs, mountpoint, record)


@pytest.mark.slow
def test_blobs_through_a_redirecting_cdn_get_no_credentials(
    lazyfs: Lazyfs, tmp_path: Path
) -> None:
    auth = htpasswd_auth(tmp_path / "auth", {"carol": "pw"})
    with running_registry(tmp_path / "registry", auth) as registry:
        image = publish(tmp_path / "work", registry.host, creds="carol:pw")
        with redirecting_front_end(registry, ("carol", "pw")) as front:
            front_host = front.url.removeprefix("http://")
            reference = image.converted.replace(registry.host, front_host)
            (mountpoint,) = directories(tmp_path, "mnt")
            _, record = mount_image(lazyfs, reference, str(mountpoint), INSECURE,
                                    "--creds", "carol:pw", mountpoints=[mountpoint])
            tree = scan_directory(mountpoint)
            umount_leaves_nothing(lazyfs, mountpoint, record)
        assert compare_trees(expected_rootfs_tree(image.layers), tree) == []
        assert front.redirects >= 2  # at least one per layer
        assert front.cdn_requests and all(r["status"] in (200, 206) for r in front.cdn_requests)
        assert not any("Authorization" in r["headers"] for r in front.cdn_requests)


@pytest.mark.slow
def test_mirror_serves_manifest_and_blobs(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    with running_registry(tmp_path / "origin") as origin:  # empty: only the mirror has it
        reference = busybox.converted.replace(busybox.host, origin.host)
        (mountpoint,) = directories(tmp_path, "mnt")
        lazyfs.mountpoints.append(mountpoint)
        one_line_error(lazyfs.run("mount", reference, str(mountpoint), INSECURE), "not found")
        _, record = mount_image(lazyfs, reference, str(mountpoint), INSECURE,
                                "--mirror", busybox.host, mountpoints=[mountpoint])
        assert all(source.startswith(f"http://{busybox.host}/") for source in record["sources"])
        assert (mountpoint / "etc" / "hostname").read_text() == "changed\n"
        umount_leaves_nothing(lazyfs, mountpoint, record)


# -- offline -------------------------------------------------------------------------------------


def test_the_pull_policy_says_when_a_remembered_tag_is_asked_for(
    lazyfs: Lazyfs, tmp_path: Path
) -> None:
    """`--pull missing` (the default) mounts the manifest the disk cache remembers for a tag
    without asking the registry, as `docker run` runs an image pulled before; `--pull always`
    asks, and finds the tag moved; `--pull never` takes the disk cache alone, and names a tag it
    does not remember."""
    first, second = directories(tmp_path, "first", "second")

    def mounted_digest(*options: str) -> str:
        _, record = mount_image(lazyfs, old.converted, str(first), INSECURE, *options,
                                mountpoints=[first])
        umount_leaves_nothing(lazyfs, first, record)
        return str(record["images"][0]["manifest_digest"])

    def image_entries_last_used() -> list[float]:
        with contextlib.closing(sqlite3.connect(lazyfs.cache_dir / "index.sqlite")) as db:
            return [row[0] for row in db.execute(
                "SELECT last_used FROM entries WHERE kind IN ('imgtag', 'imgdata') ORDER BY key")]

    with running_registry(tmp_path / "registry") as registry:
        old = publish(tmp_path / "old", registry.host)
        old_digest = mounted_digest()
        moved = publish(tmp_path / "new", registry.host,
                        layers=[base_layer(), change_layer("-moved")])
        assert moved.converted == old.converted  # the same tag, another manifest
        before = image_entries_last_used()
        assert mounted_digest() == old_digest
        # Read from their files by the command, the entries' use is noted by the daemon.
        after = image_entries_last_used()
        assert len(after) == len(before) == 3
        assert all(a > b for a, b in zip(after, before, strict=True))
        new_digest = mounted_digest("--pull", "always")
        assert new_digest != old_digest
        registry.stop()
        lazyfs.expected_log_levels.add("WARNING")  # the daemon finds the registry down
        assert mounted_digest("--pull", "never") == new_digest
        unknown = lazyfs.run("mount", f"{registry.host}/test/other:v1", str(second), INSECURE,
                             "--pull", "never")
        one_line_error(unknown, f"{registry.host}/test/other:v1", "--pull never")


def test_an_image_mounted_before_mounts_again_while_its_registry_is_down(
    lazyfs: Lazyfs, tmp_path: Path
) -> None:
    """The disk cache remembers the manifest the tag pointed to, the manifests and config by
    digest (checked when read back), and the layers' metadata and chunks: with the registry
    gone the image mounts again, serves what was read before and fails the rest fast."""
    first, second = directories(tmp_path, "first", "second")
    with running_registry(tmp_path / "registry") as registry:
        image = publish(tmp_path / "work", registry.host)
        _, record = mount_image(lazyfs, image.converted, str(first), INSECURE,
                                mountpoints=[first])
        hostname = (first / "etc" / "hostname").read_text()
        umount_leaves_nothing(lazyfs, first, record)
        registry.stop()
        never = lazyfs.run("mount", f"{registry.host}/test/other:v1", str(second), INSECURE)
        one_line_error(never, registry.host, "test/other")
        lazyfs.expected_log_levels.add("WARNING")
        lazyfs.mountpoints.append(second)
        # The tag is asked for (and the registry found down) only under --pull always.
        again = lazyfs.run("mount", image.converted, str(second), INSECURE, "--pull", "always")
        assert again.returncode == 0, again.stderr
        assert f"@{record['images'][0]['manifest_digest']} " in again.stdout
        assert "remembered from an earlier mount" in again.stderr
        assert (second / "etc" / "hostname").read_text() == hostname
        with pytest.raises(OSError) as unread:
            (second / "bin" / "busybox").read_bytes()
        assert unread.value.errno == errno.EIO
        offline = lazyfs.record(second)
        assert offline is not None
        umount_leaves_nothing(lazyfs, second, offline)
        # A remembered manifest or config that no longer matches its digest is not used.
        kept = sorted((lazyfs.cache_dir / "data" / "imgdata").rglob("*"))
        kept = [path for path in kept if path.is_file()]
        assert len(kept) == 2  # the manifest and the config
        for path in kept:
            path.write_bytes(path.read_bytes().replace(b"{", b"[", 1))
        damaged = lazyfs.run("mount", image.converted, str(second), INSECURE, "--pull", "always")
        assert damaged.returncode == 2 and registry.host in damaged.stderr, damaged.stderr
        assert "does not match its digest" in damaged.stderr
