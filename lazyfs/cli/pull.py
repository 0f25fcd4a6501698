"""`lazyfs pull --containerd SOCKET IMAGE_REF`: make a seekable EROFS image runnable by
containerd through the lazyfs snapshotter, without downloading its layers."""

from __future__ import annotations

import argparse

from lazyfs.cli._images import add_registry_arguments, platform_of, registry_options
from lazyfs.layer.tuning import DEFAULT_READ_TIMEOUT_S
from lazyfs.snapshotter.pull import SNAPSHOTTER, pull_into_containerd

DEFAULT_NAMESPACE = "default"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="make a seekable EROFS image runnable by containerd, its layers mounted lazily",
        description="Resolve IMAGE_REF (pinned by digest), store its index, manifest and "
        "config in containerd's content store, name the image, and prepare every layer "
        f"through the `{SNAPSHOTTER}` snapshotter (`lazyfs snapshotter`), which mounts it "
        "lazily: no layer is downloaded. Then: "
        f"`ctr run --snapshotter {SNAPSHOTTER} IMAGE_REF ID COMMAND`.",
    )
    parser.add_argument("image", metavar="IMAGE_REF")
    parser.add_argument("--containerd", required=True, metavar="SOCKET",
                        help="containerd's socket, e.g. /run/containerd/containerd.sock")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, metavar="NS",
                        help=f"containerd namespace (default {DEFAULT_NAMESPACE})")
    parser.add_argument(
        "--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS",
        help="resolving the image asks its registry for at most this long, retries included "
        f"(default {DEFAULT_READ_TIMEOUT_S:g})",
    )
    add_registry_arguments(parser)
    parser.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    result = pull_into_containerd(args.image,
                                  registry_options(args, deadline_s=args.read_timeout),
                                  platform_of(args), args.containerd, args.namespace)
    print(f"{result.name}: {result.pinned} ({len(result.chain_ids)} layers, lazy)")
    return 0
