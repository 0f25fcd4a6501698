"""A warm start's first work, done while the command is still starting up.

When the disk cache holds chunks of the layers that `lazyfs run` or `lazyfs mount` is about to
mount, the daemon loads them ahead of reads, in the order the last mount read them: each frame
read back, checked against its SHA-512, decoded. That is about a millisecond of CPU per chunk,
spent while the container starts and waits for those very chunks. A `WarmStart` does it
earlier, in a process of its own while the command imports the rest of lazyfs (which keeps
one core busy and leaves the disk and the other cores idle), and the daemon inherits the
decoded chunks across its fork. What the loader has not loaded by then it goes on loading
while the container starts (`hand_over`, `WarmFeed`): the daemon takes each chunk as its
record comes, instead of loading the rest itself on the core that serves the container's
reads.

Nothing is trusted for having been loaded early. The loader authenticates each layer's
metadata entry against the annotations of the manifest (or descriptor) the disk cache
remembers, exactly as the daemon does, and checks each frame against the chunk table's
SHA-512 before decoding it to its exact size. The daemon takes a chunk only under the frame
key its own authenticated chunk table gives it, at the size the table says: a manifest
remembered for a tag that has moved since costs only chunks nobody asks for. Layers whose
tables list no frame hashes (checked by dm-verity alone) are left to the daemon. Light to
import: the standard library and the pure format modules.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.cache.disk_index import read_layer_entries
from lazyfs.cache.disk_store import read_entry
from lazyfs.cache.keys import descriptor_key, frame_key, image_data_key, layer_key, tag_key
from lazyfs.errors import LazyfsError
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_TABLE_OFFSET,
    SeekableAnnotations,
    descriptor_locations,
    is_local,
    parse_annotations,
    parse_descriptor,
)
from lazyfs.format.errors import FormatError
from lazyfs.layer.disk_entries import check_cached_metadata, check_frame

if TYPE_CHECKING:
    from lazyfs.format.platform import Platform

log = logging.getLogger(__name__)

# The records pipe's room: every chunk's record fits without the loader waiting for a reader.
RECORDS_PIPE_BYTES = 1 << 20
# How long a command that handed its loader over waits for it to end when it exits.
LOADER_EXIT_WAIT_S = 1.0


@dataclass
class WarmFeed:
    """A warm start's loader going on after the command has handed over to its daemon: the
    records of the chunks it loads next come on `records` (the chunks themselves in `area`);
    closing every copy of `stop` tells it to stop. The daemon follows it (`chunks_of` what it
    reads, `close` at the end); the command, once the daemon has forked with copies of its
    own, closes its copies."""

    area: memoryview  # read-only, shared with the loader
    records: int
    stop: int
    pending: bytes = b""  # the start of a record whose end has not come yet

    def chunks_of(self, data: bytes) -> dict[str, memoryview]:
        """The chunks of the complete records in what came before and `data`."""
        complete, _, self.pending = (self.pending + data).rpartition(b"\n")
        return _chunks(complete, self.area)

    def close(self) -> None:
        for fd in (self.records, self.stop):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class WarmLayer:
    """A layer as the disk cache remembers it: what authenticates it, and its blob size."""

    annotations: SeekableAnnotations
    blob_size: int


class WarmStart:
    """Load the chunks the disk cache in `directory` holds of the layers `find_layers` names,
    up to `budget_bytes` decoded, until told to stop (once handed over, `hand_over`).

    The loading runs in a child process forked at `start` (before the command has threads or
    its heavy imports): a thread would contend with the imports for the interpreter lock. It
    writes each chunk into shared memory mapped before the fork, which the daemon forked later
    inherits as it is, and tells the command where on a pipe (then, after `hand_over`, the
    daemon, which inherits the pipe too)."""

    def __init__(self, directory: Path, find_layers: Callable[[], list[WarmLayer]],
                 budget_bytes: int) -> None:
        self._directory = directory
        self._find_layers = find_layers
        self._budget = budget_bytes
        self._area: mmap.mmap | None = None
        self._pid = 0
        self._records = -1  # the child's records come on this pipe
        self._stop = -1  # closing this pipe tells the child to stop

    def start(self) -> WarmStart | None:
        """Fork the loader; None (nothing started) when the system refuses."""
        try:
            self._area = mmap.mmap(-1, max(self._budget, mmap.PAGESIZE))
            records_r, records_w = os.pipe()
            with contextlib.suppress(OSError):  # room for every record without waiting
                fcntl.fcntl(records_w, fcntl.F_SETPIPE_SZ, RECORDS_PIPE_BYTES)
            stop_r, stop_w = os.pipe()
            pid = os.fork()
        except OSError as exc:
            log.info("warm start: not started: %s", exc)
            return None
        if pid == 0:  # the loader
            code = 0
            try:
                os.close(records_r)
                os.close(stop_w)
                self._load(records_w, stop_r)
            # A warm start only saves time: whatever stops the loader, the daemon loads the
            # rest (and reports what is wrong with the disk cache, if anything).
            except BrokenPipeError:
                log.debug("warm start: nobody takes the chunks any more")
            except (OSError, ValueError, sqlite3.Error, LazyfsError) as exc:
                code = 1
                log.info("warm start: stopped: %s", exc)
            except KeyboardInterrupt:
                code = 1
                log.debug("warm start: interrupted")
            except BaseException:
                code = 1
                log.warning("warm start: the loader failed (the mount loads the rest itself)",
                            exc_info=True)
            finally:
                os._exit(code)
        os.close(records_w)
        os.close(stop_r)
        self._pid, self._records, self._stop = pid, records_r, stop_w
        return self

    def hand_over(self) -> tuple[dict[str, memoryview], WarmFeed | None]:
        """For a daemon about to start: the chunks loaded by now, and the loader going on
        (None once it has ended), which the daemon follows on its own core while the
        container starts, instead of loading the rest itself. The loader is collected when
        this process exits (told to stop by then, when the daemon ended)."""
        if self._area is None or not self._pid:
            return {}, None
        received, ended = self._receive(b"", 0.0)
        feed = WarmFeed(memoryview(self._area).toreadonly(), self._records, self._stop)
        chunks = feed.chunks_of(received)
        atexit.register(_collect, self._pid)
        if ended:
            feed.close()
            return chunks, None
        return chunks, feed

    def _receive(self, received: bytes, wait_s: float) -> tuple[bytes, bool]:
        """`received` and the records there are now or come within `wait_s`; True once the
        loader ended."""
        deadline = time.monotonic() + wait_s
        while select.select([self._records], [], [], max(0.0, deadline - time.monotonic()))[0]:
            piece = os.read(self._records, 65536)
            if not piece:
                return received, True
            received += piece
        return received, False

    # -- in the child --------------------------------------------------------------------------

    def _load(self, records: int, stop: int) -> None:
        assert self._area is not None
        used = 0
        for layer in self._find_layers():
            for key, data in self._layer_chunks(layer):
                if select.select([stop], [], [], 0)[0] or used + len(data) > self._budget:
                    return
                self._area[used:used + len(data)] = data
                os.write(records, f"{key} {used} {len(data)}\n".encode())
                used += len(data)

    def _layer_chunks(self, layer: WarmLayer) -> Iterator[tuple[str, bytes]]:
        """(frame key, decoded chunk) of each chunk the disk holds of `layer`, in the order
        its last mount read them, each checked as the daemon checks a frame read back."""
        key = layer_key(layer.annotations)
        entry = None if key is None else read_entry(self._directory, key)
        if key is None or entry is None:
            return
        metadata, _ = check_cached_metadata(layer.annotations, entry, layer.blob_size)
        if metadata.table.hash_algorithm == HASH_NONE:
            return
        for chunk, entry_key in read_layer_entries(self._directory, key):
            if not 0 <= chunk < metadata.table.chunk_count or entry_key != frame_key(metadata,
                                                                                    chunk):
                continue
            frame = read_entry(self._directory, entry_key)
            if frame is None:
                continue
            try:
                yield entry_key, check_frame(metadata, {}, chunk, frame,
                                             metadata.frame_range(chunk)[0])
            except FormatError:
                continue  # the daemon finds it bad too, drops it and fetches the chunk


# -- which layers: what the disk cache remembers of an image or a layer URL ----------------------


def _chunks(records: bytes, area: memoryview) -> dict[str, memoryview]:
    """The chunks `records` (complete lines "KEY OFFSET SIZE") name, as views of `area`."""
    chunks: dict[str, memoryview] = {}
    for line in records.decode().splitlines():
        key, offset, size = line.split()
        chunks[key] = area[int(offset):int(offset) + int(size)]
    return chunks


def _collect(pid: int) -> None:
    """Collect a loader (at the command's exit): one killed, or one handed over to a daemon,
    which stops once the daemon is gone; one still going after a while is killed."""
    deadline = time.monotonic() + LOADER_EXIT_WAIT_S
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)


def remembered_image_layers(directory: Path, registry: str, repository: str, reference: str,
                            platform: Platform) -> list[WarmLayer]:
    """The seekable layers of the image the disk cache remembers for `reference` (a tag: the
    manifest it pointed to last; a digest: that manifest), through an index for `platform`;
    [] when it remembers none."""
    from lazyfs.format.oci import Index, detect_media_type, parse_manifest, parse_manifest_or_index

    if reference.startswith(("sha256:", "sha512:")):
        digest = reference
    else:
        pointer = read_entry(directory, tag_key(registry, repository, reference))
        if pointer is None:
            return []
        digest = str(json.loads(pointer)["digest"])
    body = _remembered(directory, digest)
    if body is None:
        return []
    top = parse_manifest_or_index(body, detect_media_type(body, None))
    if isinstance(top, Index):
        digest = top.select(platform).digest
        body = _remembered(directory, digest)
        if body is None:
            return []
        top = parse_manifest(body, detect_media_type(body, None))
    return [WarmLayer(parse_annotations(dict(layer.annotations), layer.digest), layer.size)
            for layer in top.layers if ANNOTATION_CHUNK_TABLE_OFFSET in layer.annotations]


def remembered_layer(directory: Path, blob: str, descriptor: str | None) -> list[WarmLayer]:
    """The layer at the URL `blob`, as its descriptor says: the local file `descriptor` when
    it names one, else the descriptor the disk cache remembers for the blob (looked for where
    the daemon looks); [] when there is none."""
    for location in descriptor_locations(blob, descriptor):
        text = (Path(location.removeprefix("file://")).read_bytes() if is_local(location)
                else read_entry(directory, descriptor_key(location)))
        if text is not None:
            found = parse_descriptor(text, location)
            return [WarmLayer(found.seekable(location), found.size)]
    return []


def _remembered(directory: Path, digest: str) -> bytes | None:
    """The manifest of `digest` the disk cache holds, if it matches the digest."""
    from lazyfs.format.oci import digest_of

    key = image_data_key(digest)
    body = None if key is None else read_entry(directory, key)
    if body is None or digest_of(body, digest.partition(":")[0]) != digest:
        return None
    return body
