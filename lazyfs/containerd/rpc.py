"""Typed gRPC bindings of containerd's services: method paths, unary calls for clients, and
method handlers for servers, over the generated messages of `api/`.

Bound by hand rather than with generated `_pb2_grpc` stubs so that mypy checks both ends.
containerd picks the namespace from the `containerd-namespace` metadata of each call, and a
lease from `containerd-lease`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

SNAPSHOTS = "containerd.services.snapshots.v1.Snapshots"
CONTENT = "containerd.services.content.v1.Content"
IMAGES = "containerd.services.images.v1.Images"
LEASES = "containerd.services.leases.v1.Leases"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
CALL_TIMEOUT_S = 60.0

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Metadata = Sequence[tuple[str, str]]


def call(
    channel: grpc.Channel,
    service: str,
    method: str,
    request: Message,
    response_type: type[Resp],
    *,
    metadata: Metadata = (),
    timeout_s: float = CALL_TIMEOUT_S,
) -> Resp:
    """One unary call. Raises grpc.RpcError (its code() and details() say why)."""
    stub = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=_serialize,
        response_deserializer=response_type.FromString,
    )
    response: Resp = stub(request, timeout=timeout_s, metadata=tuple(metadata))
    return response


def stream_stream(
    channel: grpc.Channel,
    service: str,
    method: str,
    requests: Iterator[Message],
    response_type: type[Resp],
    *,
    metadata: Metadata = (),
    timeout_s: float = CALL_TIMEOUT_S,
) -> list[Resp]:
    """A bidirectional streaming call, all responses collected. Raises grpc.RpcError."""
    stub = channel.stream_stream(
        f"/{service}/{method}",
        request_serializer=_serialize,
        response_deserializer=response_type.FromString,
    )
    return list(stub(requests, timeout=timeout_s, metadata=tuple(metadata)))


def unary_handler(
    behavior: Callable[[Req, grpc.ServicerContext], Message], request_type: type[Req]
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=request_type.FromString, response_serializer=_serialize
    )


def stream_handler(
    behavior: Callable[[Req, grpc.ServicerContext], Iterator[Message]], request_type: type[Req]
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_stream_rpc_method_handler(
        behavior, request_deserializer=request_type.FromString, response_serializer=_serialize
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
