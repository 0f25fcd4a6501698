"""`lazyfs convert SRC` for a whole image: command-line arguments in, the new digest out.

The glue between argparse and `converter.image_convert.convert_image`: credentials and
registry options for the source and the push, the OCI layout target (`DIR` or `DIR:TAG`), the
platform, and one trio run. Progress lines go to stderr (convert_image's default), the digest
of the new image to stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import trio

from converter.errors import ConvertError
from converter.image_convert import ImageConvertResult, convert_image, parse_push_reference
from converter.image_source import RegistrySource, open_image_source
from converter.layer import ConvertOptions
from lazyfs.fetch.registry_options import RegistryOptions, parse_credentials
from lazyfs.format.platform import parse_platform
from lazyfs.format.reference import validate_tag


def _layout_target(text: str) -> tuple[Path, str | None]:
    """DIR or DIR:TAG (DIR itself may contain ':' when it exists)."""
    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag or Path(text).exists() or not path:
        return Path(text), None
    try:
        return Path(path), validate_tag(tag)
    except ValueError as e:
        raise ConvertError(f"OCI layout {text}: {e}") from None


def run_image_convert(args: argparse.Namespace,
                      layer_options: ConvertOptions | None = None) -> int:
    """`lazyfs convert SRC` for a whole image; prints the new image's digest and returns 0.

    Reads args.source and, where present: oci_layout ("DIR" or "DIR:TAG"), push, platform,
    insecure_registry, mirror (a list), creds and push_creds ("USER:PASS"; --creds counts for
    the push too when it goes to the source's registry), jobs, force (replace a name taken in
    the layout). Raises ConvertError and the fetch layer's errors, for one-line messages.
    """
    src = args.source
    creds_text, push_text = getattr(args, "creds", None), getattr(args, "push_creds", None)
    creds = None if creds_text is None else parse_credentials(creds_text, "--creds")
    push_creds = None if push_text is None else parse_credentials(push_text, "--push-creds")
    insecure = bool(getattr(args, "insecure_registry", False))
    mirrors = tuple(getattr(args, "mirror", None) or ())
    source_options = RegistryOptions(creds, insecure, mirrors)
    push = getattr(args, "push", None)
    layout, tag = (None, None)
    if getattr(args, "oci_layout", None):
        layout, tag = _layout_target(args.oci_layout)
    try:
        platform = parse_platform(args.platform) if getattr(args, "platform", None) else None
    except ValueError as e:
        raise ConvertError(str(e)) from None
    image_source = open_image_source(src, source_options)
    if (push is not None and push_creds is None and isinstance(image_source, RegistrySource)
            and image_source.reference.registry == parse_push_reference(push).registry):
        push_creds = creds  # the same registry: the same account

    async def main() -> ImageConvertResult:
        async with image_source:
            return await convert_image(
                image_source, dest_layout=layout, push=push, layer_options=layer_options,
                platform=platform, jobs=int(getattr(args, "jobs", 2) or 2), dest_tag=tag,
                overwrite=bool(getattr(args, "force", False)),
                push_registry=RegistryOptions(push_creds, insecure),
            )

    result = trio.run(main)
    print(result.digest)
    return 0
