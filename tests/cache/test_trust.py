"""The disk cache's directory is used only when no other user can change what its path leads to
(the directory and each of its parents, as OpenSSH judges a user's files), and what the cache
creates is private to its owner. Tests that give a directory to another user need root."""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs.cache.disk_index import DiskCacheError
from lazyfs.cache.disk_store import DiskStore
from lazyfs.cache.trust import (
    FOREIGN,
    GROUP_WRITABLE,
    WORLD_WRITABLE,
    UnsafeDirectory,
    find_unsafe,
    prepare_directory,
)

NOBODY = 65534  # a uid that is neither ours nor root's


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def frame_key(name: str) -> str:
    return "frame-" + hashlib.sha512(name.encode()).hexdigest()


@pytest.fixture
def default_umask() -> Iterator[None]:
    """The usual umask (022), under which an older lazyfs left its files readable by all."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_directory_others_can_write_is_named_with_its_owner_and_mode(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    uid = os.geteuid()
    cache.chmod(0o777)
    found = find_unsafe(cache)
    assert found == UnsafeDirectory(str(cache), uid, 0o777, WORLD_WRITABLE)
    assert str(found) == (f"{cache} (owner {pwd.getpwuid(uid).pw_name} (uid {uid}), mode 0777) "
                          "can be written by other users")
    cache.chmod(0o770)
    assert find_unsafe(cache) == UnsafeDirectory(str(cache), uid, 0o770, GROUP_WRITABLE)
    # The sticky bit covers the entries below a directory, not the directory itself: others
    # could create in it what the cache has not created yet.
    cache.chmod(0o1777)
    assert find_unsafe(cache) == UnsafeDirectory(str(cache), uid, 0o1777, WORLD_WRITABLE)


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    """Without the sticky bit, whoever can write a parent can rename the cache away and put
    another in its place; with it (like /tmp), others may add names beside a directory of
    ours, never rename or remove ours."""
    parent = tmp_path / "parent"
    parent.mkdir()
    cache = parent / "cache"
    cache.mkdir(mode=0o700)
    uid = os.geteuid()
    parent.chmod(0o777)
    assert find_unsafe(cache) == UnsafeDirectory(str(parent), uid, 0o777, WORLD_WRITABLE)
    parent.chmod(0o1777)
    assert find_unsafe(cache) is None
    # A cache not created yet below it: nothing on the way is ours yet, another user could
    # create it first.
    assert find_unsafe(parent / "later") == UnsafeDirectory(str(parent), uid, 0o1777,
                                                            WORLD_WRITABLE)


def test_a_link_is_judged_where_it_leads_and_where_it_lies(tmp_path: Path) -> None:
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(open_to_all)
    found = find_unsafe(link)
    assert found is not None and found.path == str(open_to_all)
    below = open_to_all / "link"  # a link to a safe directory, in a directory open to all
    below.symlink_to(ours)
    found = find_unsafe(below)
    assert found is not None and found.path == str(open_to_all)


@pytest.mark.root
def test_a_directory_or_parent_of_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o755)
    cache = parent / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, -1)
    assert find_unsafe(cache) == UnsafeDirectory(str(cache), NOBODY, 0o700, FOREIGN)
    assert f"uid {NOBODY}" in str(find_unsafe(cache))
    os.chown(cache, 0, -1)
    os.chown(parent, NOBODY, -1)
    assert find_unsafe(cache) == UnsafeDirectory(str(parent), NOBODY, 0o755, FOREIGN)
    # A user is trusted with what is theirs: the same directories, judged for that user.
    assert find_unsafe(cache, uid=NOBODY) is None


@pytest.mark.root
def test_a_sticky_parent_does_not_cover_an_entry_of_another_user(tmp_path: Path) -> None:
    """In /tmp, another user's directory, or their link to a directory of ours, is theirs to
    replace."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = shared / "cache"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, -1)
    assert find_unsafe(theirs) == UnsafeDirectory(str(theirs), NOBODY, 0o700, FOREIGN)
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = shared / "link"
    link.symlink_to(ours)
    os.lchown(link, NOBODY, -1)
    assert find_unsafe(link) == UnsafeDirectory(str(shared), 0, 0o1777, WORLD_WRITABLE)


def test_a_cache_is_created_private_and_an_older_one_of_ours_tightened(
        tmp_path: Path, default_umask: None) -> None:
    created = tmp_path / "new" / "cache"
    assert prepare_directory(created) is None
    assert mode(created) == 0o700
    older = tmp_path / "older"
    older.mkdir(mode=0o755)
    assert prepare_directory(older) is None
    assert mode(older) == 0o700
    # One that others can write is refused as it is: they may have planted something in it.
    opened = tmp_path / "opened"
    opened.mkdir()
    opened.chmod(0o777)
    found = prepare_directory(opened)
    assert found is not None and found.path == str(opened)
    assert mode(opened) == 0o777


def test_the_store_refuses_a_directory_others_can_write_and_writes_nothing_there(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(DiskCacheError) as refused:
        DiskStore(cache, 1 << 20)
    message = str(refused.value)
    assert "\n" not in message
    assert f"disk cache {cache} refused: {cache} (owner " in message
    assert "mode 0777) can be written by other users" in message
    assert f"chmod go-w {cache}" in message and "--cache-dir" in message
    assert list(cache.iterdir()) == [] and mode(cache) == 0o777


@pytest.mark.root
def test_the_store_refuses_a_directory_of_another_user(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, NOBODY, -1)
    with pytest.raises(DiskCacheError,
                       match=rf"\(uid {NOBODY}\), mode 0755\) belongs to another user"):
        DiskStore(cache, 1 << 20)
    assert list(cache.iterdir()) == []


def test_what_the_store_creates_is_private(tmp_path: Path, default_umask: None) -> None:
    cache = tmp_path / "new" / "cache"
    store = DiskStore(cache, 64 << 20)  # room for entries beside the index
    try:
        key = frame_key("one")
        store.put(key, b"one")
        tag = "imgtag-" + hashlib.sha256(b"registry.test/app:v1").hexdigest()
        store.put(tag, b'{"digest": "sha256:..."}')
        # Checked while the index is open: its -wal and -shm files exist only then.
        files = [cache / name for name in ("index.sqlite", "index.sqlite-wal",
                                           "index.sqlite-shm")]
        files += [store.path(key), store.path(tag)]
        directories = [cache, cache / "data", cache / "tmp", store.path(key).parent.parent,
                       store.path(key).parent, store.path(tag).parent]
        assert {str(path): mode(path) for path in files} == {str(path): 0o600 for path in files}
        assert {str(path): mode(path) for path in directories} == {
            str(path): 0o700 for path in directories}
    finally:
        store.close()


def test_a_cache_of_an_older_lazyfs_is_made_private_when_opened(
        tmp_path: Path, default_umask: None) -> None:
    cache = tmp_path / "cache"
    DiskStore(cache, 1 << 20).close()
    cache.chmod(0o755)  # as an older lazyfs left them
    (cache / "index.sqlite").chmod(0o644)
    store = DiskStore(cache, 1 << 20)
    try:
        store.put(frame_key("one"), b"one")
        assert mode(cache) == 0o700
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            assert mode(cache / name) == 0o600, name
    finally:
        store.close()
