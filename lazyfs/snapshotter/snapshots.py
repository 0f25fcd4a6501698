"""containerd's snapshot operations with overlayfs semantics, over the metadata store.

Each snapshot of our own has a directory ROOT/snapshots/ID holding `fs` (its contents, the
upper directory while active) and `work` (overlayfs's work directory). A remote snapshot's
contents are the EROFS mount of its layer, which `RemoteLayers` provides. Mounts follow
containerd's overlay snapshotter: no parent → a bind mount of `fs`; an active snapshot → an
overlay of the parents' contents with `fs` as upper; a view of one parent → a read-only
bind of it, of several → a read-only overlay.

A Prepare whose labels name a seekable EROFS layer goes to `RemoteLayers.prepare`, which
mounts it and records it committed under the target name containerd asked for; Prepare
then answers AlreadyExists, and containerd uses that snapshot instead of unpacking. A target
that is a remote snapshot already answers AlreadyExists only if `RemoteLayers.share` says it
may stand for what this Prepare asks (see `content_check`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from lazyfs.snapshotter.store import (
    AlreadyExistsError,
    InvalidArgumentError,
    Kind,
    NotFoundError,
    Snapshot,
    Store,
)

log = logging.getLogger(__name__)

TARGET_LABEL = "containerd.io/snapshot.ref"
# Stat of a remote snapshot: whether its layer is proven to hold its diff ID (a `Verdict`).
CONTENT_LABEL = "containerd.io/snapshot/lazyfs.content"
SNAPSHOTS_DIR = "snapshots"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


class RemoteLayers(Protocol):
    """What the snapshot service needs of the lazy layer mounts."""

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """Mount the layer `labels` name and record it committed under the target name:
        True, or False when the labels name no seekable EROFS layer (prepare as usual).
        Raises SnapshotError for a layer that cannot be mounted."""

    def share(self, existing: Snapshot, labels: Mapping[str, str]) -> bool:
        """Whether the committed remote snapshot `existing` may stand for a Prepare of its
        name with `labels` (True), or was renamed out of the way because its layer does not
        hold what its image claims (False: prepare the target afresh). Raises SnapshotError
        when that cannot be told now."""

    def content_state(self, snapshot: Snapshot) -> str:
        """Whether the remote `snapshot`'s layer is proven to hold what its image claims:
        "holds", "pending", "lies" or "unclaimed"."""

    def path(self, snapshot: Snapshot) -> str:
        """The contents of the remote snapshot (its layer's EROFS mountpoint), mounting the
        layer again if it is not. Raises SnapshotError naming the layer if it cannot be."""

    def release(self, layer_id: int, digest: str) -> None:
        """Unmount a layer no snapshot uses any more."""


class Snapshots:
    """The operations of containerd's snapshots service. Thread-safe."""

    def __init__(self, root: str, store: Store, remote: RemoteLayers) -> None:
        self.root = root
        self.store = store
        self.remote = remote
        os.makedirs(os.path.join(root, SNAPSHOTS_DIR), mode=0o700, exist_ok=True)

    def directory(self, snapshot_id: int) -> str:
        return os.path.join(self.root, SNAPSHOTS_DIR, str(snapshot_id))

    def contents(self, snapshot: Snapshot) -> str:
        if snapshot.layer_id is not None:
            return self.remote.path(snapshot)
        return os.path.join(self.directory(snapshot.id), "fs")

    # -- the service -------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Raises AlreadyExistsError also when a remote layer now stands for the target."""
        target = labels.get(TARGET_LABEL, "")
        if target:
            try:
                existing: Snapshot | None = self.store.get(target)
            except NotFoundError:
                existing = None
            if existing is not None and existing.kind == Kind.COMMITTED and (
                    existing.layer_id is None or self.remote.share(existing, labels)):
                raise AlreadyExistsError(f"target snapshot {target} already exists")
            if self.remote.prepare(key, parent, labels):
                raise AlreadyExistsError(f"target snapshot {target} already exists")
        return self._create(key, parent, Kind.ACTIVE, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(key, parent, Kind.VIEW, labels)

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.store.chain(key))

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        snapshot = self.store.get(key)
        if snapshot.layer_id is not None:
            raise InvalidArgumentError(f"snapshot {key} is a remote layer, not active")
        size_bytes, inodes = disk_usage(self.contents(snapshot))
        self.store.commit(name, key, labels, size_bytes, inodes)

    def remove(self, key: str) -> None:
        snapshot, freed = self.store.remove(key)
        if snapshot.layer_id is None:
            shutil.rmtree(self.directory(snapshot.id), ignore_errors=True)
        if freed is not None:
            self.remote.release(freed.id, freed.digest)

    def stat(self, key: str) -> Snapshot:
        snapshot = self.store.get(key)
        if snapshot.layer_id is None:
            return snapshot
        state = self.remote.content_state(snapshot)
        return replace(snapshot, labels={**snapshot.labels, CONTENT_LABEL: state})

    def update(self, key: str, labels: Mapping[str, str], paths: list[str]) -> Snapshot:
        return self.store.update_labels(key, labels, paths)

    def all(self) -> list[Snapshot]:
        return self.store.all()

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): measured now while active, as committed otherwise."""
        snapshot = self.store.get(key)
        if snapshot.kind == Kind.ACTIVE:
            return disk_usage(self.contents(snapshot))
        return snapshot.size_bytes, snapshot.inodes

    def cleanup(self) -> None:
        """Remove directories no snapshot owns (left by a crash between a removal's commit
        and its deletion, or by a failed prepare)."""
        owned = self.store.snapshot_ids()
        base = os.path.join(self.root, SNAPSHOTS_DIR)
        for name in os.listdir(base):
            if not name.isdigit() or int(name) not in owned:
                log.info("removing %s: no snapshot owns it", os.path.join(base, name))
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------

    def _create(
        self, key: str, parent: str, kind: Kind, labels: Mapping[str, str]
    ) -> list[Mount]:
        def make_dirs(snapshot: Snapshot) -> None:
            directory = self.directory(snapshot.id)
            shutil.rmtree(directory, ignore_errors=True)  # a leftover of a crash
            os.mkdir(directory, 0o700)
            os.mkdir(os.path.join(directory, "fs"), 0o755)
            if kind == Kind.ACTIVE:
                os.mkdir(os.path.join(directory, "work"), 0o700)

        # The parents' contents first: a layer that cannot be mounted fails the call before
        # anything is created.
        try:
            parents = self.store.chain(parent) if parent else []
        except NotFoundError:
            parents = []  # store.create says which parent of which key
        for snapshot in parents:
            self.contents(snapshot)
        snapshot = self.store.create(key, parent, kind, labels, on_created=make_dirs)
        return self._mounts([snapshot, *parents])

    def _mounts(self, chain: list[Snapshot]) -> list[Mount]:
        """The mounts of `chain[0]`, whose ancestors follow it."""
        snapshot, parents = chain[0], chain[1:]
        if snapshot.kind == Kind.COMMITTED:
            # Not for containers, but containerd may ask (e.g. to diff): read-only contents.
            parents = chain
        if not parents:
            mode = "rw" if snapshot.kind == Kind.ACTIVE else "ro"
            return [Mount("bind", self.contents(snapshot), (mode, "rbind"))]
        lowers = [self.contents(parent) for parent in parents]
        if snapshot.kind == Kind.ACTIVE:
            directory = self.directory(snapshot.id)
            options = (
                "index=off",
                f"workdir={os.path.join(directory, 'work')}",
                f"upperdir={os.path.join(directory, 'fs')}",
                "lowerdir=" + ":".join(lowers),
            )
            return [Mount("overlay", "overlay", options)]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", ("index=off", "lowerdir=" + ":".join(lowers)))]


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes in blocks, inodes) under `path`, hard links counted once; 0 when missing."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for directory, dirs, files in os.walk(path):
        for name in [directory, *(os.path.join(directory, f) for f in files + dirs)]:
            try:
                info = os.lstat(name)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            size += info.st_blocks * 512
    return size, len(seen)
