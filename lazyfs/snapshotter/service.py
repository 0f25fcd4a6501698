"""The snapshots gRPC service: protobuf in, `Snapshots` call, protobuf out, and our errors
as gRPC status codes (containerd maps them back: NotFound, AlreadyExists, …).

containerd shows a failed call's details to the user (`ctr: failed to prepare extraction
snapshot …: <details>`), so a SnapshotError's one-line message is what they read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from lazyfs.containerd import rpc
from lazyfs.containerd.api import snapshots_pb2 as pb
from lazyfs.containerd.api import types_pb2
from lazyfs.errors import LazyfsError
from lazyfs.snapshotter.filters import matches, parse_filters
from lazyfs.snapshotter.snapshots import Mount, Snapshots
from lazyfs.snapshotter.store import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    Snapshot,
)

log = logging.getLogger(__name__)
Req = TypeVar("Req", bound=Message)
LIST_BATCH = 100
_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (LazyfsError, grpc.StatusCode.UNKNOWN),
    (OSError, grpc.StatusCode.INTERNAL),
]


def _mounts(mounts: list[Mount]) -> list[types_pb2.Mount]:
    return [types_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def info_of(snapshot: Snapshot) -> pb.Info:
    info = pb.Info(
        name=snapshot.key,
        parent=snapshot.parent,
        kind=pb.Kind.Name(int(snapshot.kind)),
        labels=snapshot.labels,
    )
    info.created_at.FromNanoseconds(int(snapshot.created_at * 1e9))
    info.updated_at.FromNanoseconds(int(snapshot.updated_at * 1e9))
    return info


class SnapshotsService:
    """Handlers for `containerd.services.snapshots.v1.Snapshots`."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    def handler(self) -> grpc.GenericRpcHandler:
        unary = rpc.unary_handler
        handlers = {
            "Prepare": unary(self._guard(self.prepare), pb.PrepareSnapshotRequest),
            "View": unary(self._guard(self.view), pb.ViewSnapshotRequest),
            "Mounts": unary(self._guard(self.mounts), pb.MountsRequest),
            "Commit": unary(self._guard(self.commit), pb.CommitSnapshotRequest),
            "Remove": unary(self._guard(self.remove), pb.RemoveSnapshotRequest),
            "Stat": unary(self._guard(self.stat), pb.StatSnapshotRequest),
            "Update": unary(self._guard(self.update), pb.UpdateSnapshotRequest),
            "List": rpc.stream_handler(self._guard_stream(self.list), pb.ListSnapshotsRequest),
            "Usage": unary(self._guard(self.usage), pb.UsageRequest),
            "Cleanup": unary(self._guard(self.cleanup), pb.CleanupRequest),
        }
        return grpc.method_handlers_generic_handler(rpc.SNAPSHOTS, handlers)

    # -- methods -----------------------------------------------------------------------------

    def prepare(self, request: pb.PrepareSnapshotRequest) -> Message:
        mounts = self.snapshots.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def view(self, request: pb.ViewSnapshotRequest) -> Message:
        mounts = self.snapshots.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def mounts(self, request: pb.MountsRequest) -> Message:
        return pb.MountsResponse(mounts=_mounts(self.snapshots.mounts(request.key)))

    def commit(self, request: pb.CommitSnapshotRequest) -> Message:
        self.snapshots.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    def remove(self, request: pb.RemoveSnapshotRequest) -> Message:
        self.snapshots.remove(request.key)
        return empty_pb2.Empty()

    def stat(self, request: pb.StatSnapshotRequest) -> Message:
        return pb.StatSnapshotResponse(info=info_of(self.snapshots.stat(request.key)))

    def update(self, request: pb.UpdateSnapshotRequest) -> Message:
        paths = list(request.update_mask.paths)
        updated = self.snapshots.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=info_of(updated))

    def list(self, request: pb.ListSnapshotsRequest) -> Iterator[Message]:
        filters = parse_filters(list(request.filters))
        batch: list[pb.Info] = []
        for snapshot in self.snapshots.all():
            info = info_of(snapshot)
            if matches(filters, info.name, info.parent, dict(info.labels), snapshot.kind):
                batch.append(info)
            if len(batch) >= LIST_BATCH:
                yield pb.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    def usage(self, request: pb.UsageRequest) -> Message:
        size_bytes, inodes = self.snapshots.usage(request.key)
        return pb.UsageResponse(size=size_bytes, inodes=inodes)

    def cleanup(self, request: pb.CleanupRequest) -> Message:
        self.snapshots.cleanup()
        return empty_pb2.Empty()

    # -- errors ------------------------------------------------------------------------------

    def _guard(
        self, method: Callable[[Req], Message]
    ) -> Callable[[Req, grpc.ServicerContext], Message]:
        def handle(request: Req, context: grpc.ServicerContext) -> Message:
            try:
                return method(request)
            except Exception as exc:
                _abort(context, method.__name__, exc)
                raise  # unreachable: abort raises

        return handle

    def _guard_stream(
        self, method: Callable[[Req], Iterator[Message]]
    ) -> Callable[[Req, grpc.ServicerContext], Iterator[Message]]:
        def handle(request: Req, context: grpc.ServicerContext) -> Iterator[Message]:
            try:
                yield from method(request)
            except Exception as exc:
                _abort(context, method.__name__, exc)

        return handle


def _abort(context: grpc.ServicerContext, name: str, exc: Exception) -> Any:
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS):
                log.warning("%s: %s", name, exc)
            context.abort(code, str(exc))
    log.exception("%s failed", name)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
