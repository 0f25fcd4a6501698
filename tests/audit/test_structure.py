"""What a converted image's documents must say, alone and against the source's: what a
conversion may change (diff IDs, legacy ids, OCI media types, seekable annotations) passes,
anything else is named."""

from __future__ import annotations

import copy
from typing import Any

from lazyfs.audit.documents import ImageDocuments, PlatformImage
from lazyfs.audit.structure import check_image, compare_images
from lazyfs.format import oci
from lazyfs.format.descriptor import Descriptor
from lazyfs.format.platform import Platform

LAYER = "sha256:" + "1" * 64
SEEKABLE = {"dev.containerd.erofs.zstd.chunk_table_offset": "100",
            "dev.containerd.erofs.zstd.chunk_digest": "sha512:" + "2" * 128}


def config(arch: str = "amd64", **extra: Any) -> dict[str, Any]:
    return {"architecture": arch, "os": "linux", "config": {"Env": ["A=1"], "Image": "x"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "3" * 64]}, **extra}


def image(arch: str = "amd64", *, layer_type: str = oci.EROFS_LAYER_ZSTD,
          layer_notes: dict[str, str] | None = None, manifest_type: str = oci.OCI_MANIFEST,
          config_type: str = oci.OCI_CONFIG, platform: Platform | None = None,
          entry_notes: dict[str, str] | None = None,
          conf: dict[str, Any] | None = None) -> PlatformImage:
    layer = Descriptor(layer_type, LAYER, 10, annotations=layer_notes or {})
    manifest = oci.Manifest(Descriptor(config_type, "sha256:" + "4" * 64, 10), (layer,),
                            media_type=manifest_type)
    entry = Descriptor(manifest_type, "sha256:" + arch.ljust(64, "5")[:64], 10,
                       platform=platform or Platform("linux", arch),
                       annotations=entry_notes or {})
    return PlatformImage(f"linux/{arch}", entry.platform, entry, manifest,
                         conf if conf is not None else config(arch))


def documents(*images: PlatformImage, index_type: str = oci.OCI_INDEX,
              notes: dict[str, str] | None = None) -> ImageDocuments:
    index = oci.Index(tuple(i.entry for i in images), index_type, notes or {})
    return ImageDocuments("test", Descriptor(index_type, "sha256:" + "6" * 64, 10), index,
                          images, (), ())


def source_image(arch: str = "amd64", **kw: Any) -> PlatformImage:
    kw.setdefault("layer_type", oci.DOCKER_LAYER_GZIP)
    kw.setdefault("manifest_type", oci.DOCKER_MANIFEST)
    kw.setdefault("config_type", oci.DOCKER_CONFIG)
    return image(arch, **kw)


def test_a_sound_image_alone() -> None:
    assert check_image(documents(image(), image("arm64"))) == []


def test_alone_layers_configs_and_platforms() -> None:
    bad_config = config()
    bad_config["rootfs"]["diff_ids"] = []
    found = check_image(documents(
        image(layer_type=oci.OCI_LAYER_GZIP),
        image("arm64", conf=config("amd64")),
        image("s390x", config_type="application/json", conf=config("s390x")),
        image("ppc64le", conf={**bad_config, "architecture": "ppc64le"})))
    assert found == [
        "linux/amd64: layer 1/1 (sha256:111111111111): media type "
        f"{oci.OCI_LAYER_GZIP}, not seekable EROFS",
        "linux/arm64: the index says linux/arm64, the config linux/amd64",
        "linux/s390x: config media type application/json, not an image config",
        "linux/ppc64le: config: 0 diff_ids for 1 layers",
    ]


def test_what_a_conversion_changes_is_no_difference() -> None:
    """Docker types become OCI ones, diff IDs and legacy ids change, seekable annotations
    come; containerd keys its JSON differently."""
    theirs = source_image(layer_notes={"keep": "me"}, entry_notes={"e": "1"})
    conf = config()
    conf["rootfs"]["diff_ids"] = ["sha256:" + "7" * 64]
    del conf["config"]["Image"]
    mine = image(layer_notes={"keep": "me", **SEEKABLE, "dev.lazyfs.prefetch": "x"},
                 entry_notes={"e": "1"}, conf=dict(reversed(list(conf.items()))))
    pairs, problems = compare_images(documents(mine, notes={"n": "1"}),
                                     documents(theirs, index_type=oci.DOCKER_MANIFEST_LIST,
                                               notes={"n": "1"}))
    assert problems == []
    assert [(p.name, p.image, p.source) for p in pairs] == [("linux/amd64", mine, theirs)]


def test_platforms_are_paired_by_os_architecture_and_variant() -> None:
    arm = Platform("linux", "arm64", "v8")
    pairs, problems = compare_images(
        documents(image("arm64", platform=Platform("linux", "arm64")), image("riscv64")),
        documents(source_image("arm64", platform=arm), source_image("amd64")))
    assert [p.name for p in pairs] == ["linux/arm64"]
    assert problems == ["linux/amd64: in the source, missing from the image",
                        "linux/riscv64: in the image, not in the source"]


def test_os_features_the_source_lacks_are_differences() -> None:
    erofs = Platform("linux", "amd64", os_features=("erofs",))
    mine = image(platform=erofs, conf=config(**{"os.features": ["erofs"]}))
    _, problems = compare_images(documents(mine), documents(source_image()))
    assert problems == ["linux/amd64: platform os.features erofs: not in the source",
                        "linux/amd64: config os.features erofs: not in the source"]
    theirs = source_image(platform=erofs, conf=config(**{"os.features": ["erofs"]}))
    assert compare_images(documents(mine), documents(theirs))[1] == []
    assert compare_images(documents(image()), documents(theirs))[1] == [
        "linux/amd64: platform os.features erofs: in the source, not in the image",
        "linux/amd64: config os.features erofs: in the source, not in the image"]


def test_other_changes_are_named() -> None:
    theirs = source_image(layer_notes={"keep": "me"}, entry_notes={"e": "1"})
    conf = copy.deepcopy(config())
    conf["config"]["Env"] = ["A=2"]
    conf["author"] = "someone"
    mine = image(layer_notes=SEEKABLE, entry_notes={"e": "2"}, conf=conf,
                 manifest_type=oci.DOCKER_MANIFEST_LIST)
    _, problems = compare_images(documents(mine, notes={"n": "2"}),
                                 documents(theirs, index_type=oci.DOCKER_MANIFEST_LIST))
    assert problems == [
        'index annotation n: "2", not in the source',
        'linux/amd64: index entry annotation e: "2", the source has "1"',
        f"linux/amd64: manifest: media type {oci.DOCKER_MANIFEST_LIST}, the source's is "
        f"{oci.DOCKER_MANIFEST}",
        'linux/amd64: config: author: "someone", not in the source',
        'linux/amd64: config: config.Env: ["A=2"], the source has ["A=1"]',
        'linux/amd64: layer 1/1 (sha256:111111111111) annotation keep: missing (the source '
        'has "me")',
    ]


def test_a_manifest_is_not_an_index_and_layers_are_counted() -> None:
    lone = ImageDocuments("test", image().entry, None, (image(),), (), ())
    two = image()
    assert two.manifest is not None
    layers = (*two.manifest.layers, *two.manifest.layers)
    two = PlatformImage(two.name, two.platform, two.entry,
                        oci.Manifest(two.manifest.config, layers), two.config)
    _, problems = compare_images(lone, documents(source_image()))
    assert problems == ["index: the image is a manifest, the source an index"]
    _, problems = compare_images(documents(two), documents(source_image()))
    assert problems == ["linux/amd64: 2 layers, the source has 1"]
