"""Small real images for tests, built from Debian's busybox-static, and what mounting them shows.

- `base_layer()`: /bin/busybox, applet symlinks, /etc files, directories of several modes.
- `change_layer()`: modifies files, deletes some with whiteouts (`.wh.NAME`) and empties a
  directory with an opaque whiteout (`.wh..wh..opq`), adding one file back into it.
- `ghost_layer()`: a new directory holding a whiteout of a name no layer has.
- `write_oci_image` / `write_index_image`: ordinary gzip OCI images in an OCI layout directory
  (written here independently of the converter's own layout code).
- `docker_archive` / `docker_oci_archive`: what `docker save` writes, old and new form.
- `skopeo_push`: copy a layout's image into a registry with skopeo.
- `expected_rootfs_tree(layers)`: the tree an overlay mount of the layers must show.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from converter.tar_members import OPAQUE_XATTR, ORIGIN_XATTR, normalize_path
from converter.tree import TreeEntry, scan_tar

BUSYBOX = Path("/bin/busybox")
MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
APPLETS = ("sh", "ls", "cat", "echo", "true")


def busybox_bytes() -> bytes:
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed (/bin/busybox)")
    return BUSYBOX.read_bytes()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Tar:
    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 - closed by bytes()
            fileobj=self._out, mode="w", format=tarfile.PAX_FORMAT
        )

    def _add(self, name: str, kind: bytes, mode: int, data: bytes | None = None,
             link: str = "", uid: int = 0, gid: int = 0) -> _Tar:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, MTIME, uid, gid
        info.linkname = link
        info.size = len(data) if data is not None else 0
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> _Tar:
        return self._add(name, tarfile.DIRTYPE, mode, uid=uid, gid=gid)

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> _Tar:
        return self._add(name, tarfile.REGTYPE, mode, data, uid=uid, gid=gid)

    def symlink(self, name: str, target: str) -> _Tar:
        return self._add(name, tarfile.SYMTYPE, 0o777, link=target)

    def hardlink(self, name: str, target: str) -> _Tar:
        return self._add(name, tarfile.LNKTYPE, 0o644, link=target)

    def bytes(self) -> bytes:
        self._tar.close()
        return self._out.getvalue()


def base_layer() -> bytes:
    """busybox, a few applets as symlinks, /etc, and directories of several modes."""
    return _base(_Tar()).bytes()


def ghost_layer(directory: str = "fresh", *, on_base: bool = False) -> bytes:
    """A new directory holding a file and a whiteout of a name no layer has (tools write
    such whiteouts: `DIRECTORY/.wh.ghost`), and one in the root (`.wh.phantom-DIRECTORY`);
    with `on_base`, on top of the base layer's contents in the same layer."""
    tar = _base(_Tar()) if on_base else _Tar()
    tar.dir(directory).file(f"{directory}/.wh.ghost", b"").file(f"{directory}/real", b"real\n")
    tar.file(f".wh.phantom-{directory}", b"")
    return tar.bytes()


def _base(tar: _Tar) -> _Tar:
    tar.dir("bin").file("bin/busybox", busybox_bytes(), 0o755)
    for applet in APPLETS:
        tar.symlink(f"bin/{applet}", "busybox")
    tar.dir("etc")
    tar.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    tar.file("etc/group", b"root:x:0:\nuser:x:1000:\n")
    tar.file("etc/hostname", b"base\n")
    tar.file("etc/os-release", b"NAME=lazyfs-test\n")
    tar.file("etc/shadow", b"root:*:19000::::::\n", 0o640, gid=42)
    tar.hardlink("etc/os-release.link", "etc/os-release")
    tar.dir("root", 0o700).dir("tmp", 0o1777).dir("home").dir("home/user", 0o750, 1000, 1000)
    tar.file("home/user/.profile", b"export PS1='$ '\n", uid=1000, gid=1000)
    tar.dir("var").dir("var/cache").dir("var/cache/app")
    tar.file("var/cache/app/a.bin", bytes(range(256)) * 64)
    tar.file("var/cache/app/b.txt", b"cached\n")
    tar.dir("var/cache/app/sub").file("var/cache/app/sub/c.txt", b"deep\n")
    tar.dir("var/log").file("var/log/old.log", b"old\n")
    return tar


def change_layer(flavour: str = "") -> bytes:
    """Modify, add, delete (whiteouts) and empty a directory (opaque whiteout)."""
    tar = _Tar().dir("etc")
    tar.file("etc/hostname", f"changed{flavour}\n".encode())
    tar.file("etc/motd", f"welcome{flavour}\n".encode(), 0o600)
    tar.file("etc/.wh.os-release", b"")
    tar.dir("bin").file("bin/.wh.cat", b"")
    tar.dir("var").dir("var/cache").dir("var/cache/app", 0o700)
    tar.file("var/cache/app/.wh..wh..opq", b"")
    tar.file("var/cache/app/fresh.txt", b"fresh\n")
    tar.file("var/.wh.log", b"")  # removes the directory var/log and all below it
    tar.dir("tmp", 0o1777).file("tmp/scratch", b"x" * 10, 0o666)
    return tar.bytes()


def busybox_layers(flavour: str = "") -> list[bytes]:
    return [base_layer(), change_layer(flavour)]


def config_json(layers: Sequence[bytes], os: str = "linux", arch: str = "amd64",
                variant: str | None = None) -> bytes:
    """An image config as docker writes it, legacy `Image` id included."""
    config = {
        "architecture": arch, "os": os, "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "Image": "sha256:" + "0" * 64},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    return json.dumps(config).encode()


def _descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def _put(layout: Path, data: bytes) -> None:
    path = layout / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _start_layout(layout: Path) -> dict[str, object]:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index_path = layout / "index.json"
    if index_path.exists():
        return json.loads(index_path.read_text())
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def _manifest(layout: Path, layers: Sequence[bytes], config: bytes) -> bytes:
    blobs = [gzip.compress(layer, mtime=0) for layer in layers]
    for blob in [*blobs, config]:
        _put(layout, blob)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config),
        "layers": [_descriptor(OCI_LAYER_GZIP, blob) for blob in blobs],
    }).encode()
    _put(layout, manifest)
    return manifest


def _tag(layout: Path, index: dict[str, object], entry: dict[str, object], tag: str) -> None:
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index["manifests"] = [*index["manifests"], entry]  # type: ignore[misc]
    (layout / "index.json").write_text(json.dumps(index))


@dataclass(frozen=True)
class BuiltImage:
    layout: Path
    tag: str
    digest: str  # of the manifest, or the index
    layers: dict[str, list[bytes]]  # uncompressed layer tars by platform ("linux/amd64")


def write_oci_image(layout: Path, tag: str, layers: Sequence[bytes] | None = None, *,
                    entrypoint: Sequence[str] | None = None) -> BuiltImage:
    """A single-manifest gzip image for linux/amd64, tagged `tag` in the layout; with
    `entrypoint`, its config runs that (with no Cmd)."""
    layers = list(layers) if layers is not None else busybox_layers()
    index = _start_layout(layout)
    config = config_json(layers)
    if entrypoint is not None:
        values = json.loads(config)
        values["config"] |= {"Entrypoint": list(entrypoint), "Cmd": None}
        config = json.dumps(values).encode()
    manifest = _manifest(layout, layers, config)
    _tag(layout, index, _descriptor(OCI_MANIFEST, manifest), tag)
    return BuiltImage(layout, tag, sha256(manifest), {"linux/amd64": layers})


def write_image_blobs(layout: Path, tag: str, layers: Sequence[tuple[str, bytes, dict[str, str]]],
                      diff_ids: Sequence[str]) -> BuiltImage:
    """A linux/amd64 image of ready-made layer blobs: (media type, blob, annotations) each."""
    index = _start_layout(layout)
    config = json.loads(config_json([]))
    config["rootfs"]["diff_ids"] = list(diff_ids)
    config["history"] = [{"created_by": f"layer {i}"} for i in range(len(layers))]
    config_bytes = json.dumps(config).encode()
    for _, blob, _ in layers:
        _put(layout, blob)
    _put(layout, config_bytes)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_bytes),
        "layers": [_descriptor(kind, blob, **({"annotations": notes} if notes else {}))
                   for kind, blob, notes in layers],
    }).encode()
    _put(layout, manifest)
    _tag(layout, index, _descriptor(OCI_MANIFEST, manifest), tag)
    return BuiltImage(layout, tag, sha256(manifest), {"linux/amd64": []})


def write_index_image(layout: Path, tag: str,
                      platforms: dict[str, Sequence[bytes]] | None = None,
                      platform_fields: dict[str, dict[str, object]] | None = None) -> BuiltImage:
    """A multi-platform image (an index); by default linux/amd64 and linux/arm64, sharing
    the base layer and differing in the second. `platform_fields` adds fields ("os.version",
    "os.features") to a platform's index entry and config, by name ("linux/amd64")."""
    if platforms is None:
        platforms = {"linux/amd64": busybox_layers(), "linux/arm64": busybox_layers("-arm")}
    index = _start_layout(layout)
    entries = []
    for name, layers in platforms.items():
        os, arch, *variant = name.split("/")
        extra = (platform_fields or {}).get(name, {})
        config = json.loads(config_json(layers, os, arch, *variant)) | extra
        manifest = _manifest(layout, layers, json.dumps(config).encode())
        platform = {"architecture": arch, "os": os} | ({"variant": variant[0]} if variant else {})
        platform |= extra
        entries.append(_descriptor(OCI_MANIFEST, manifest, platform=platform))
    image_index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                              "manifests": entries}).encode()
    _put(layout, image_index)
    _tag(layout, index, _descriptor(OCI_INDEX, image_index), tag)
    return BuiltImage(layout, tag, sha256(image_index),
                      {k: list(v) for k, v in platforms.items()})


def _archive(out: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    tar = _Tar()
    for name in sorted({n.rsplit("/", 1)[0] for n in [*files, *(links or {})] if "/" in n}):
        tar.dir(name)
    for name, data in files.items():
        tar.file(name, data)
    for name, target in (links or {}).items():
        tar.symlink(name, target)
    out.write_bytes(tar.bytes())
    return out


def docker_archive(out: Path, layers: Sequence[bytes], repo_tag: str = "lazyfs/test:v1") -> Path:
    """The older `docker save` form: `<id>/layer.tar` per layer (a repeated layer is a symlink
    to the first copy, as docker writes it), `<config hex>.json`, `manifest.json`."""
    config = config_json(layers)
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    files: dict[str, bytes] = {config_name: config}
    links: dict[str, str] = {}
    names, first = [], {}
    for number, layer in enumerate(layers):
        layer_id = hashlib.sha256(f"{number}:{sha256(layer)}".encode()).hexdigest()
        name = f"{layer_id}/layer.tar"
        files[f"{layer_id}/VERSION"] = b"1.0"
        files[f"{layer_id}/json"] = json.dumps({"id": layer_id}).encode()
        if layer in first:
            links[name] = f"../{first[layer]}"
        else:
            first[layer] = name
            files[name] = layer
        names.append(name)
    files["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}]).encode()
    repo, _, tag = repo_tag.rpartition(":")
    files["repositories"] = json.dumps({repo: {tag: names[-1].split("/")[0]}}).encode()
    return _archive(out, files, links)


def docker_oci_archive(out: Path, image: BuiltImage, repo_tag: str = "lazyfs/test:v1") -> Path:
    """The newer `docker save` form: an OCI layout in the tar, plus a `manifest.json`."""
    files = {str(p.relative_to(image.layout)): p.read_bytes()
             for p in sorted(image.layout.rglob("*")) if p.is_file()}
    manifest = json.loads(files[f"blobs/sha256/{image.digest.partition(':')[2]}"])
    blob = "blobs/sha256/{}".format
    files["manifest.json"] = json.dumps([{
        "Config": blob(manifest["config"]["digest"].partition(":")[2]),
        "RepoTags": [repo_tag],
        "Layers": [blob(layer["digest"].partition(":")[2]) for layer in manifest["layers"]],
    }]).encode()
    return _archive(out, files)


def skopeo_push(layout: Path, tag: str, registry_host: str, target: str,
                *, all_platforms: bool = False, creds: str | None = None) -> None:
    """`skopeo copy` an image of a layout to `registry_host/target` (plain HTTP)."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed")
    args = [skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false"]
    if all_platforms:
        args.append("--all")
    if creds is not None:
        args.append(f"--dest-creds={creds}")
    args += [f"oci:{layout}:{tag}", f"docker://{registry_host}/{target}"]
    subprocess.run(args, check=True, capture_output=True, timeout=120)


# --- what a mount must show --------------------------------------------------------------------


def _remove(tree: dict[str, tuple[int, TreeEntry]], path: str, *, keep_self: bool = False) -> None:
    prefix = path + "/" if path != "." else ""
    for key in [k for k in tree if k.startswith(prefix) and k != "."]:
        del tree[key]
    if not keep_self:
        tree.pop(path, None)


def _explicit_dirs(layer: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as archive:
        return {normalize_path(m.name, m.name) for m in archive if m.isdir()}


def expected_rootfs_tree(layers: Sequence[bytes]) -> dict[str, TreeEntry]:
    """The merged tree of uncompressed tar layers applied in order (OCI semantics), comparable
    with `converter.tree.scan_directory` of a mount of the converted image.

    A whiteout removes the path and all below it; an opaque directory hides everything below
    it from lower layers; a directory entry over a lower directory merges with it, taking its
    own owner, mode and xattrs; anything else replaces. A directory a layer only implies (its
    files have no entry for it) keeps the lower directory's attributes. Note that an overlay
    of per-layer images shows the upper layer's implied directory instead (root 0755): the
    two agree for layers that carry their parent directories, as docker and buildkit write
    them and as the layers here do.

    Written apart from `lazyfs.audit.merge` on purpose: it is the oracle that
    `tests/audit/test_merge.py` holds `merge_layers` against, and a shared body would agree
    with itself.
    """
    merged: dict[str, tuple[int, TreeEntry]] = {}
    for number, layer in enumerate(layers):
        upper, explicit = scan_tar(io.BytesIO(layer)), _explicit_dirs(layer)
        for path in sorted(upper):  # parents before children
            entry = upper[path]
            if entry.kind == "chardev" and entry.rdev == (0, 0):
                _remove(merged, path)
                continue
            lower = merged.get(path)
            opaque = entry.kind == "dir" and entry.xattrs.get(OPAQUE_XATTR) == b"y"
            both_dirs = lower is not None and lower[1].kind == "dir" == entry.kind
            if lower is not None and not both_dirs:
                _remove(merged, path)
            elif opaque:
                _remove(merged, path, keep_self=True)
            if both_dirs and path not in explicit:
                continue  # implied here: the lower directory stays as it is
            # overlayfs keeps its own xattrs out of the merged tree
            xattrs = {k: v for k, v in entry.xattrs.items()
                      if k not in (OPAQUE_XATTR, ORIGIN_XATTR)}
            merged[path] = (number, replace(entry, xattrs=xattrs))
    groups: dict[tuple[int, str], list[str]] = {}
    for path, (number, entry) in merged.items():
        if entry.inode_group is not None:
            groups.setdefault((number, entry.inode_group), []).append(path)
    tree = {path: replace(entry, inode_group=None) for path, (_, entry) in merged.items()}
    for paths in groups.values():
        if len(paths) > 1:
            for path in paths:
                tree[path] = replace(tree[path], inode_group=min(paths))
    return tree
