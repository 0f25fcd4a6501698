"""containerd's CRI plugin in tests, driven as kubelet drives it: the plugin's configuration
for `running_containerd`, a pause image, and a small client (`Cri`) whose RuntimeService
calls go to containerd's socket and ImageService calls to the image service a test names
(lazyfs's, or containerd's own).

What a test machine allows: the plugin runs with `disable_cgroup`, so that a pod needs no
cgroups of its own (runc cannot make them everywhere: in a container, in a hierarchy not
delegated to it) and leaves none in the machine's hierarchy; no AppArmor, an OOM score
adjustment no lower than ours, no unprivileged ports or ICMP (sysctls a host-network pod
cannot take), and no CNI: every pod shares the host's network namespace.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from lazyfs.containerd import rpc
from lazyfs.cri.api import api_pb2 as cri
from tests.support.containerd import Containerd, running_containerd
from tests.support.images import base_layer, skopeo_push, write_oci_image

RUNTIME = "runtime.v1.RuntimeService"
IMAGES = "runtime.v1.ImageService"
PAUSE = "test/pause:1"
CALL_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0
Resp = TypeVar("Resp", bound=Message)

CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  enable_unprivileged_icmp = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
"""
MIRROR = """  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
"""


def cri_config(work: Path, pause: str, registries: Sequence[str],
               snapshotter: str = "lazyfs") -> str:
    """The CRI plugin's tables: `pause` as the sandbox image, plain HTTP to `registries`
    (`host:port` each), images unpacked into `snapshotter` (containerd's `overlayfs` for
    the baseline of tools/bench_cri), no CNI configuration (`work/cni` stays empty)."""
    for sub in ("bin", "conf"):
        (work / "cni" / sub).mkdir(parents=True, exist_ok=True)
    text = CRI_CONFIG.format(pause=pause, cni=work / "cni", snapshotter=snapshotter)
    return text + "".join(MIRROR.format(host=host) for host in registries)


def publish_pause_image(work: Path, host: str) -> str:
    """An image whose entrypoint sleeps (busybox), as `test/pause:1` in the registry at
    `host`; returns its reference."""
    layers = [base_layer()]
    image = write_oci_image(work / "images" / "pause", "1", layers,
                            entrypoint=["/bin/busybox", "sleep", "86400"])
    skopeo_push(image.layout, "1", host, PAUSE)
    return f"{host}/{PAUSE}"


@dataclass
class Cri:
    """CRI calls: RuntimeService on `runtime_socket`, ImageService on `image_socket`."""

    runtime_socket: Path
    image_socket: Path
    pods: list[str] = field(default_factory=list)  # what `remove_pods` takes down

    def _call(self, socket: Path, service: str, method: str, request: Message,
              response_type: type[Resp], timeout_s: float) -> Resp:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            return rpc.call(channel, service, method, request, response_type,
                            timeout_s=timeout_s)

    def runtime(self, method: str, request: Message, response_type: type[Resp],
                timeout_s: float = CALL_TIMEOUT_S) -> Resp:
        return self._call(self.runtime_socket, RUNTIME, method, request, response_type,
                          timeout_s)

    def image(self, method: str, request: Message, response_type: type[Resp],
              timeout_s: float = CALL_TIMEOUT_S) -> Resp:
        return self._call(self.image_socket, IMAGES, method, request, response_type,
                          timeout_s)

    # -- ImageService ------------------------------------------------------------------------

    def pull(self, image: str, auth: cri.AuthConfig | None = None) -> str:
        """PullImage; returns the image_ref."""
        request = cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=auth)
        return self.image("PullImage", request, cri.PullImageResponse).image_ref

    def status(self, image: str) -> cri.Image | None:
        """ImageStatus: the image, None if the runtime does not know it."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image))
        response = self.image("ImageStatus", request, cri.ImageStatusResponse)
        return response.image if response.HasField("image") else None

    def list_images(self) -> list[cri.Image]:
        return list(self.image("ListImages", cri.ListImagesRequest(),
                               cri.ListImagesResponse).images)

    def remove(self, image: str) -> None:
        self.image("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=image)),
                   cri.RemoveImageResponse)

    # -- RuntimeService ----------------------------------------------------------------------

    def sandbox_config(self, name: str, log_directory: Path) -> cri.PodSandboxConfig:
        """A host-network pod (no CNI here) logging below `log_directory`."""
        node = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=secrets.token_hex(8),
                                            namespace="default"),
            log_directory=str(log_directory),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=node)),
        )

    def run_pod(self, config: cri.PodSandboxConfig) -> str:
        """RunPodSandbox; returns the sandbox ID."""
        sandbox_id = self.runtime("RunPodSandbox", cri.RunPodSandboxRequest(config=config),
                                  cri.RunPodSandboxResponse).pod_sandbox_id
        self.pods.append(sandbox_id)
        return sandbox_id

    def remove_pod(self, sandbox_id: str) -> None:
        self.runtime("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                     cri.StopPodSandboxResponse)
        self.runtime("RemovePodSandbox",
                     cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                     cri.RemovePodSandboxResponse)
        if sandbox_id in self.pods:
            self.pods.remove(sandbox_id)

    def remove_pods(self) -> None:
        """Take down every pod `run_pod` started and no test removed, as far as possible."""
        for sandbox_id in list(self.pods):
            with contextlib.suppress(grpc.RpcError):
                self.remove_pod(sandbox_id)

    def run_container(self, sandbox_id: str, sandbox: cri.PodSandboxConfig, name: str,
                      image_ref: str, command: Sequence[str]) -> str:
        """`create_container` and `start_container`; returns the container's ID."""
        container_id = self.create_container(sandbox_id, sandbox, name, image_ref, command)
        self.start_container(container_id)
        return container_id

    def create_container(self, sandbox_id: str, sandbox: cri.PodSandboxConfig, name: str,
                         image_ref: str, command: Sequence[str]) -> str:
        """CreateContainer of `image_ref` (what PullImage answered, as kubelet passes it);
        its log is `name.log` in the pod's log directory. Returns its ID."""
        node = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=image_ref),
            command=list(command),
            log_path=f"{name}.log",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(namespace_options=node)),
        )
        request = cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config,
                                             sandbox_config=sandbox)
        return self.runtime("CreateContainer", request,
                            cri.CreateContainerResponse).container_id

    def start_container(self, container_id: str) -> None:
        self.runtime("StartContainer", cri.StartContainerRequest(container_id=container_id),
                     cri.StartContainerResponse)

    def wait_exited(self, container_id: str, timeout_s: float = EXIT_TIMEOUT_S
                    ) -> cri.ContainerStatus:
        """The container's status once it has exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.runtime("ContainerStatus",
                                  cri.ContainerStatusRequest(container_id=container_id),
                                  cri.ContainerStatusResponse).status
            if status.state == cri.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"container {container_id} still {status.state} after "
                                     f"{timeout_s:.0f} s")
            time.sleep(0.1)


def log_lines(path: Path) -> list[str]:
    """The messages of a CRI container log (`TIMESTAMP STREAM TAG MESSAGE` lines)."""
    return [line.split(" ", 3)[3] for line in path.read_text().splitlines() if line]


@dataclass
class Node:
    """A Kubernetes node without kubelet: containerd with its CRI plugin, the lazyfs
    snapshotter, and lazyfs's image service (`cri.image_socket`) in front of containerd's."""

    containerd: Containerd
    cri: Cri


@contextlib.contextmanager
def running_node(work: Path, pause: str, registries: Sequence[str], *,
                 snapshotter: str = "lazyfs", snapshotter_args: Sequence[str] = ()
                 ) -> Iterator[Node]:
    """containerd (CRI plugin on, sandbox image `pause`, plain HTTP to `registries`, images
    unpacked into `snapshotter`) and the lazyfs snapshotter serving the image service (with
    `snapshotter_args` besides), under `work`; pods and all torn down on exit."""
    image_socket = work / "cri.sock"
    args = ["--image-service-address", str(image_socket),
            "--containerd-address", str(work / "containerd.sock"), *snapshotter_args]
    config = cri_config(work, pause, registries, snapshotter)
    with running_containerd(work, args, config) as containerd:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not image_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no image service on {image_socket}:\n"
                                   f"{containerd.snapshotter.log.read_text()[-4000:]}")
            time.sleep(0.05)
        node = Node(containerd, Cri(containerd.socket, image_socket))
        try:
            yield node
        finally:
            node.cri.remove_pods()
