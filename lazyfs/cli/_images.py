"""What `lazyfs mount` and `lazyfs run` share for images in registries: the registry options,
resolving references to pinned manifests, the layers one daemon serves for them, and the
checks of the options both give a mount (cache size, writable directory)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import trio

from lazyfs.cli import UserError
from lazyfs.cli.convert import parse_size
from lazyfs.fetch.errors import FetchError
from lazyfs.fetch.registry_options import RegistryOptions, parse_credentials
from lazyfs.format.platform import Platform, parse_platform
from lazyfs.format.reference import DOCKER_HUB, parse_reference
from lazyfs.fuse import kernel_mount
from lazyfs.fuse.image_mount import writable_dirs
from lazyfs.fuse.state import ImageRecord
from lazyfs.image.open import LayerSource
from lazyfs.image.registry_source import (
    ResolvedImage,
    host_platform,
    layer_sources,
    resolve_image,
)

REFERENCE_RULE = (
    "SOURCE is an image reference ([REGISTRY/]REPOSITORY[:TAG][@DIGEST]) when it is not a URL "
    "(no '://'), names no existing file or directory, and parses as a reference; otherwise it "
    "is a layer blob (http(s) URL, file:// URL or path)."
)


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("images in registries")
    group.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the manifest to pick from a multi-platform image (default: this machine's)",
    )
    group.add_argument(
        "--creds",
        metavar="USER:PASS",
        help="registry credentials (default: those of `docker login`, else anonymous)",
    )
    group.add_argument(
        "--insecure-registry",
        action="store_true",
        help="talk plain HTTP to registries and mirrors (e.g. 127.0.0.1:5000)",
    )
    group.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST",
        help="try this registry mirror first, for manifests and blobs "
        "(repeatable; content is checked against digests either way)",
    )


def count_layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def cache_size_of(args: argparse.Namespace) -> int:
    """--cache-size in bytes. Raises UserError."""
    cache_size = parse_size(args.cache_size, "--cache-size")
    if cache_size <= 0:
        raise UserError("--cache-size must be positive")
    return cache_size


def writable_upper(directory: str) -> tuple[str, str]:
    """The (upper, work) directories of --writable DIR, created if missing. Raises UserError."""
    try:
        return writable_dirs(kernel_mount.canonical(directory))
    except OSError as exc:
        raise UserError(f"--writable {directory}: {exc.strerror}") from None


def image_record(
    reference: str,
    image: ResolvedImage,
    mountpoint: str,
    upperdir: str | None,
    workdir: str | None,
) -> ImageRecord:
    """The mount's record of `image`, resolved from `reference`, stacked at `mountpoint`."""
    return ImageRecord(
        reference=reference,
        manifest_digest=image.manifest_digest,
        platform=image.platform,
        mountpoint=mountpoint,
        layers=[layer.name for layer in image.layers],
        upperdir=upperdir,
        workdir=workdir,
    )


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    """The RegistryOptions of the command line. Raises CredentialsError."""
    credentials = None if args.creds is None else parse_credentials(args.creds)
    return RegistryOptions(credentials, args.insecure_registry, tuple(args.mirror))


def platform_of(args: argparse.Namespace) -> Platform:
    if args.platform is None:
        return host_platform()
    try:
        return parse_platform(args.platform)
    except ValueError as exc:
        raise UserError(f"--platform: {exc}") from None


@dataclass
class ImageSet:
    """Resolved images and the distinct layers that serve them all (each once)."""

    images: list[ResolvedImage]
    sources: list[LayerSource]
    blob_sizes: dict[str, int]


def resolve_images(
    references: list[str], options: RegistryOptions, platform: Platform, *, insecure: bool
) -> ImageSet:
    """Resolve every reference and collect their layers; a layer shared by several images
    (or repeated in one) is listed once. Raises UserError for a malformed reference, and the
    errors of `resolve_image` (one line each)."""
    parsed = []
    for text in references:
        try:
            parsed.append(parse_reference(text))
        except ValueError as exc:
            raise UserError(str(exc)) from None

    async def main() -> ImageSet:
        images: list[ResolvedImage] = []
        sources: dict[str, LayerSource] = {}
        sizes: dict[str, int] = {}
        names: list[str] = []  # the mount's name of each distinct layer
        for text, reference in zip(references, parsed, strict=True):
            try:
                async with options.client(reference.registry) as client:
                    image = await resolve_image(client, reference, platform, insecure=insecure)
                    wanted = [
                        layer for layer in image.distinct_layers if layer.digest not in sources
                    ]
                    found = await layer_sources(reference, wanted, client, options)
            except FetchError as exc:
                hint = _hint(text, reference.registry)
                if hint:
                    raise UserError(f"{exc}{hint}") from None
                raise
            except ValueError as exc:  # a malformed registry or mirror name
                raise UserError(str(exc)) from None
            for layer, source in zip(wanted, found, strict=True):
                sources[layer.digest] = source
                sizes[layer.name] = layer.size
                names.append(layer.name)
            images.append(image)
        if len(set(names)) != len(names):
            raise UserError(f"layers of different digests share a name: {sorted(names)}")
        return ImageSet(images, list(sources.values()), sizes)

    return trio.run(main)


def _hint(text: str, registry: str) -> str:
    """A reminder when a name meant as a file was taken for a Docker Hub image."""
    if registry == DOCKER_HUB and not text.startswith(DOCKER_HUB):
        return f" (and there is no file or directory named {text!r})"
    return ""
