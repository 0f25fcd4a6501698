"""The CRI image service (`runtime.v1.ImageService`) that `lazyfs snapshotter
--image-service-address` serves for kubelet's `--image-service-endpoint`.

containerd before 2.1 unpacks whatever its CRI plugin pulls and has no processor for a
seekable EROFS layer, so its PullImage of such an image fails; PullImage comes here first. A
seekable EROFS image is pulled lazily (`lazyfs.snapshotter.pull`: index, manifest and config
into containerd's content store, each layer prepared for the `lazyfs` snapshotter, which
mounts it) and named as the CRI plugin names what it pulls itself; the call returns once the
plugin lists the image (it learns of images from containerd's events, a moment later), with
the image's ID as kubelet expects. Every other image, and every other call, goes to
containerd's own CRI image service as the bytes kubelet sent (fields this subset of the API
does not declare included), and containerd's answer comes back unchanged: status, listing,
removal and garbage collection of lazily pulled images are the plugin's own.

Which image is which: the reference is resolved here first. One with a layer that is not
seekable EROFS, one that is not an image lazyfs reads (another manifest format, none for this
platform) and one whose registry lazyfs cannot reach go to containerd, which may know more
(its own mirrors and TLS settings); an answer of the registry (an unknown image, credentials
refused) is answered here, naming the image and the cause.

The pod's pull secret (PullImage's AuthConfig) resolves the image here, and is then kept in
memory for the lazy fetches of its layers (`credentials.PullSecrets`, the snapshotter's
keychain); a pull without one resolves with the snapshotter's own credentials (`--creds`,
`docker login`'s), never with another pod's secret. containerd gets the secret with the
request bytes when it pulls the image itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import grpc
import trio

from lazyfs.containerd import rpc
from lazyfs.containerd.client import ContainerdError
from lazyfs.cri.api import api_pb2 as cri
from lazyfs.cri.credentials import AuthConfigError, PullSecrets, credentials_of
from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry import (
    NotFoundError,
    RegistryTimeoutError,
    RegistryUnavailableError,
    UnauthorizedError,
)
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.reference import parse_reference
from lazyfs.layer.errors import ImageResolveError
from lazyfs.oci.names import host_platform
from lazyfs.oci.registry_source import UnconvertedLayerError
from lazyfs.snapshotter.pull import PullResult, fetch_image, put_into_containerd

log = logging.getLogger(__name__)

SERVICE = "runtime.v1.ImageService"
CRI_NAMESPACE = "k8s.io"  # the namespace containerd's CRI plugin keeps its images in
THREADS = 8
# How long a lazy pull waits for containerd's CRI plugin to list the image.
LISTED_TIMEOUT_S = 30.0
LISTED_POLL_S = 0.05
# Failures of lazyfs's own resolution after which containerd is asked instead.
_CONTAINERD_DECIDES = (UnconvertedLayerError, ImageResolveError)
_UNREACHABLE = (RegistryUnavailableError, RegistryTimeoutError, ValueError)


@dataclass(frozen=True)
class ImageServiceConfig:
    address: str  # the unix socket kubelet connects to
    containerd_address: str  # containerd's socket (its CRI plugin's image service)
    namespace: str = CRI_NAMESPACE


class ImageService:
    """The gRPC server of the image service; `start` and `stop` from any thread."""

    def __init__(self, config: ImageServiceConfig, registry: RegistryOptions,
                 secrets: PullSecrets | None = None) -> None:
        self.config = config
        self.registry = registry
        self.secrets = secrets  # where pull secrets are kept for the snapshotter
        self._server: grpc.Server | None = None
        self._containerd: grpc.Channel | None = None
        self._pulling: dict[str, threading.Lock] = {}
        self._pulling_lock = threading.Lock()

    def start(self) -> None:
        """Listen on the socket (replacing one a previous run left). Raises OSError."""
        address = os.path.abspath(self.config.address)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        os.makedirs(os.path.dirname(address), exist_ok=True)
        self._containerd = grpc.insecure_channel(f"unix:{self.config.containerd_address}")
        server = grpc.server(ThreadPoolExecutor(max_workers=THREADS,
                                                thread_name_prefix="cri-images"))
        server.add_generic_rpc_handlers((_Handler(self),))
        if server.add_insecure_port(f"unix:{address}") == 0:
            raise OSError(f"cannot listen on {address}")
        server.start()
        os.chmod(address, 0o600)  # whoever may pull as kubelet, with its secrets: root only
        self._server = server
        log.info("serving CRI images on %s (containerd %s, namespace %s)", address,
                 self.config.containerd_address, self.config.namespace)

    def stop(self, grace_s: float) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._containerd is not None:
            self._containerd.close()
            self._containerd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.address)

    # -- calls -------------------------------------------------------------------------------

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """containerd's answer to the call, as bytes in and out; its error as it gave it."""
        assert self._containerd is not None
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._containerd.unary_unary(
            f"/{SERVICE}/{method}")
        try:
            response = call(request, timeout=context.time_remaining())
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            context.abort(code, details or code.name)
        return response

    def pull(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """PullImage: lazily when the image is seekable EROFS, else containerd's."""
        message = cri.PullImageRequest.FromString(request)
        reference = message.image.image
        if not reference:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullImage: no image given")
        try:
            parsed = parse_reference(reference)
        except ValueError:
            return self.forward("PullImage", request, context)  # containerd says what is wrong
        try:
            credentials = (credentials_of(message.auth, parsed.registry)
                           if message.HasField("auth") else None)
        except AuthConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f'failed to pull image "{reference}": {exc}')
        options = replace(self.registry, keychain=None,
                          credentials=credentials or self.registry.credentials)
        with self._lock_for(reference):
            try:
                fetched = trio.run(fetch_image, reference, options, host_platform())
            except _CONTAINERD_DECIDES as exc:
                log.info("%s: not pulled lazily (%s); containerd pulls it", reference, exc)
                return self.forward("PullImage", request, context)
            except _UNREACHABLE as exc:
                log.warning("%s: lazyfs cannot resolve it (%s); containerd pulls it",
                            reference, exc)
                return self.forward("PullImage", request, context)
            except LazyfsError as exc:
                context.abort(_code(exc), f'failed to pull image "{reference}": {exc}')
            if credentials is not None and self.secrets is not None:
                # Before containerd asks the snapshotter for the layers, which reads them.
                self.secrets.remember(parsed.registry, parsed.repository, credentials)
            try:
                result = put_into_containerd(fetched, reference,
                                             self.config.containerd_address,
                                             self.config.namespace, cri=True)
                self._wait_listed(result)
            except LazyfsError as exc:
                context.abort(_code(exc), f'failed to pull image "{reference}": {exc}')
        log.info("%s: pulled lazily as %s (%d layers)", reference, result.image_id,
                 len(result.chain_ids))
        return cri.PullImageResponse(image_ref=result.image_id).SerializeToString()

    def _lock_for(self, reference: str) -> threading.Lock:
        """One pull of a reference at a time (kubelet may ask for it from several pods)."""
        with self._pulling_lock:
            return self._pulling.setdefault(reference, threading.Lock())

    def _wait_listed(self, result: PullResult) -> None:
        """Until containerd's CRI plugin lists the image under all its names (it learns of
        them from containerd's image events). Raises ContainerdError."""
        assert self._containerd is not None
        wanted = set(result.names[1:])
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=result.image_id))
        deadline = time.monotonic() + LISTED_TIMEOUT_S
        while True:
            try:
                status = rpc.call(self._containerd, SERVICE, "ImageStatus", request,
                                  cri.ImageStatusResponse)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                raise ContainerdError(
                    f"containerd {self.config.containerd_address}: CRI ImageStatus: {details}"
                    " (is its CRI plugin enabled?)", code) from None
            listed = set(status.image.repo_tags) | set(status.image.repo_digests)
            if status.HasField("image") and wanted <= listed:
                return
            if time.monotonic() > deadline:
                raise ContainerdError(
                    f"containerd's CRI plugin does not list {result.image_id} as "
                    f"{', '.join(sorted(wanted))} within {LISTED_TIMEOUT_S:.0f} s")
            time.sleep(LISTED_POLL_S)


def _code(exc: LazyfsError) -> grpc.StatusCode:
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, UnauthorizedError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, ContainerdError) and exc.code is not None:
        return exc.code
    return grpc.StatusCode.UNKNOWN


class _Handler(grpc.GenericRpcHandler):
    """Every ImageService method, unary, as bytes: PullImage ours, the rest containerd's."""

    def __init__(self, images: ImageService) -> None:
        self.images = images

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler[Any, Any] | None:
        name, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if name != SERVICE:
            return None
        if method == "PullImage":
            return grpc.unary_unary_rpc_method_handler(self.images.pull)

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self.images.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(forward)
