"""The attack a disk cache directory open to other users allows, through the CLI against
Debian's docker-registry: a user who can write the directory plants the pointer of a tag to
an image of their choosing, which root would mount without asking the registry. The command
refuses the directory in one line that names its owner and mode, and mounts nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lazyfs.cache.disk_store import entry_path
from lazyfs.cache.keys import tag_key
from tests.mount.test_image_mount import mount_image, one_line_error, umount_leaves_nothing
from tests.support.images import busybox_layers
from tests.support.lazyfs_cli import Lazyfs
from tests.support.registry import running_registry
from tests.support.registry_images import publish

pytestmark = [pytest.mark.root, pytest.mark.network]

INSECURE = "--insecure-registry"


def test_a_tag_planted_in_a_cache_others_can_write_is_not_mounted(
    lazyfs: Lazyfs, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = lazyfs.cache_dir

    def mount(reference: str) -> tuple[str, str]:
        """(manifest digest, /etc/hostname) of `reference` as mounted."""
        _, record = mount_image(lazyfs, reference, str(mountpoint), INSECURE,
                                mountpoints=[mountpoint])
        hostname = (mountpoint / "etc" / "hostname").read_text()
        umount_leaves_nothing(lazyfs, mountpoint, record)
        return str(record["images"][0]["manifest_digest"]), hostname

    with running_registry(tmp_path / "registry") as registry:
        real = publish(tmp_path / "real", registry.host)
        planted = publish(tmp_path / "planted", registry.host,
                          layers=busybox_layers("-planted"), repository="test/planted")
        # The planted image in the cache (mounted once here; an attacker writes the same
        # files by hand), and the real tag's pointer naming it.
        planted_digest, planted_hostname = mount(planted.converted)
        assert planted_hostname == "changed-planted\n"
        pointer = entry_path(cache, tag_key(registry.host, "test/planted", "v1-erofs"))
        target = entry_path(cache, tag_key(registry.host, "test/busybox", "v1-erofs"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pointer.read_bytes())
        cache.chmod(0o777)  # what lets another user do all of the above

        for command in (("mount", real.converted, str(mountpoint), INSECURE),
                        ("run", real.converted, INSECURE, "--", "/bin/true")):
            refused = lazyfs.run(*command)
            one_line_error(refused, f"disk cache {cache} refused: {cache} (owner root (uid 0), "
                           "mode 0777) can be written by other users", f"chmod go-w {cache}")
            assert "Traceback" not in refused.stderr
        assert lazyfs.records() == [] and not os.path.ismount(mountpoint)

        # Its owner takes it back and empties it (what was planted goes with the rest): the
        # tag is asked of the registry again, and names the real image.
        cache.chmod(0o755)
        cleared = lazyfs.run("cache", "clear")
        assert cleared.returncode == 0, cleared.stderr
        real_digest, real_hostname = mount(real.converted)
        assert real_digest != planted_digest and real_hostname == "changed\n"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
