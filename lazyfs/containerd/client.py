"""A small synchronous client of containerd's API: content writes, image records, leases and
snapshot calls, in one namespace, optionally under a lease.

Errors come back as `ContainerdError` with containerd's gRPC status code and message.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from lazyfs.containerd import rpc
from lazyfs.containerd.api import content_pb2, images_pb2, leases_pb2, snapshots_pb2, types_pb2
from lazyfs.errors import LazyfsError

WRITE_CHUNK_BYTES = 1 << 20
GC_EXPIRE_LABEL = "containerd.io/gc.expire"


class ContainerdError(LazyfsError):
    """A call to containerd failed; `code` is its gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


class ContainerdClient:
    """Calls to the containerd at `address` (a unix socket) in `namespace`. Use `with`."""

    def __init__(self, address: str, namespace: str, timeout_s: float = rpc.CALL_TIMEOUT_S
                 ) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.lease: str | None = None
        target = address if address.startswith("unix:") else f"unix:{address}"
        self._channel = grpc.insecure_channel(target)

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [(rpc.NAMESPACE_HEADER, self.namespace)]
        if self.lease is not None:
            metadata.append((rpc.LEASE_HEADER, self.lease))
        return metadata

    def _call(self, service: str, method: str, request: Message,
              response_type: type[rpc.Resp]) -> rpc.Resp:
        try:
            return rpc.call(self._channel, service, method, request, response_type,
                            metadata=self._metadata(), timeout_s=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc, f"{service.rpartition('.')[2]}.{method}") from None

    # -- leases ------------------------------------------------------------------------------

    def create_lease(self, expire_s: float = 3600.0) -> str:
        """Create a lease that expires by itself (should we die before deleting it) and make
        it this client's: what the next calls create is kept until the lease goes."""
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expire_s)
        request = leases_pb2.CreateRequest(
            id=f"lazyfs-{secrets.token_hex(8)}",
            labels={GC_EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        )
        lease = self._call(rpc.LEASES, "Create", request, leases_pb2.CreateResponse).lease.id
        self.lease = lease
        return lease

    def delete_lease(self, lease: str, *, sync: bool = False) -> None:
        """Delete the lease; with `sync`, return once the garbage collection that follows
        has run (what only the lease held is gone)."""
        if self.lease == lease:
            self.lease = None
        self._call(rpc.LEASES, "Delete", leases_pb2.DeleteRequest(id=lease, sync=sync),
                   empty_pb2.Empty)

    # -- content -----------------------------------------------------------------------------

    def content_labels(self, digest: str) -> dict[str, str] | None:
        """The labels of a blob in the content store, None if it is not there."""
        try:
            info = self._call(rpc.CONTENT, "Info", content_pb2.InfoRequest(digest=digest),
                              content_pb2.InfoResponse).info
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return dict(info.labels)

    def write_content(self, digest: str, data: bytes, labels: Mapping[str, str]) -> None:
        """Store `data` (checked against `digest` by containerd) with `labels`; a blob that
        is there already gets the labels added."""
        if self.content_labels(digest) is not None:
            self.update_content_labels(digest, labels)
            return
        ref = f"lazyfs-{digest}"

        def requests() -> Iterator[Message]:
            for offset in range(0, len(data), WRITE_CHUNK_BYTES):
                yield content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, total=len(data), expected=digest,
                    offset=offset, data=data[offset:offset + WRITE_CHUNK_BYTES])
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=ref, total=len(data), expected=digest,
                offset=len(data), labels=dict(labels))

        try:
            rpc.stream_stream(self._channel, rpc.CONTENT, "Write", requests(),
                              content_pb2.WriteContentResponse, metadata=self._metadata(),
                              timeout_s=self.timeout_s)
        except grpc.RpcError as exc:
            error = _error(exc, f"Content.Write {digest}")
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise error from None
            self.update_content_labels(digest, labels)

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=FieldMask(paths=[f"labels.{name}" for name in labels]),
        )
        self._call(rpc.CONTENT, "Update", request, content_pb2.UpdateResponse)

    # -- images ------------------------------------------------------------------------------

    def put_image(self, name: str, target: Descriptor, labels: Mapping[str, str]) -> None:
        """Create the image record `name`, or point an existing one at `target`."""
        image = images_pb2.Image(
            name=name, labels=dict(labels),
            target=types_pb2.Descriptor(media_type=target.media_type, digest=target.digest,
                                        size=target.size))
        try:
            self._call(rpc.IMAGES, "Create", images_pb2.CreateImageRequest(image=image),
                       images_pb2.CreateImageResponse)
        except ContainerdError as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            request = images_pb2.UpdateImageRequest(
                image=image, update_mask=FieldMask(paths=["target", "labels"]))
            self._call(rpc.IMAGES, "Update", request, images_pb2.UpdateImageResponse)

    def delete_image(self, name: str, *, sync: bool = False) -> None:
        """Remove the image record `name` (absent is fine); with `sync`, return once the
        garbage collection it starts has run."""
        try:
            self._call(rpc.IMAGES, "Delete", images_pb2.DeleteImageRequest(name=name, sync=sync),
                       empty_pb2.Empty)
        except ContainerdError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot_labels(self, snapshotter: str, key: str) -> dict[str, str] | None:
        """The labels of snapshot `key` (the snapshotter's, under the namespace's), or None
        if the namespace has no such snapshot."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            response = self._call(rpc.SNAPSHOTS, "Stat", request,
                                  snapshots_pb2.StatSnapshotResponse)
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return dict(response.info.labels)

    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
                ) -> list[types_pb2.Mount]:
        """Raises ContainerdError (code ALREADY_EXISTS for a remote snapshot)."""
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels))
        return list(self._call(rpc.SNAPSHOTS, "Prepare", request,
                               snapshots_pb2.PrepareSnapshotResponse).mounts)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(rpc.SNAPSHOTS, "Remove", request, empty_pb2.Empty)


def _error(exc: grpc.RpcError, what: str) -> ContainerdError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if code is not None else "error"
    return ContainerdError(f"containerd {what}: {details} ({name})", code)
