"""The configuration file of `lazyfs snapshotter`: TOML, `--config FILE`, else
/etc/lazyfs/config.toml when it exists.

`SCHEMA` is the one table of what a file may hold: per key its section, the kind of value
(`values.py`, which checks it, from the file and from the command line alike) and its
minimum, the option that overrides it, the dataclass field it sets and what it means; README's
table of keys is checked against it. A file and the command line each give `Setting`s by key
(`settings_of_document`, `settings_of_flags`), the flags' replace the file's (`merge`), and
`snapshotter_config` and `image_service_config` make of them the frozen dataclasses the
daemon and the CRI image service take (defaults are theirs). All of it is pure but
`read_document`, the one place a file is read, and `load_settings`, which also checks that
the credentials file named can be read. Every error is a ConfigError of one line naming the
file, section and key (or the option) and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.cri.image_service import CRI_NAMESPACE, ImageServiceConfig
from lazyfs.errors import LazyfsError
from lazyfs.fetch.base import SpeedLimit
from lazyfs.fetch.registry_auth import Credentials
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.layer.tuning import ImageTuning
from lazyfs.mount.host import LayerLimits
from lazyfs.node.values import (
    BOOLEAN,
    COUNT,
    HOST_PORT,
    HOSTS,
    MIRRORS,
    NAME,
    PATH,
    SECONDS,
    SIZE,
    Expected,
    Kind,
)
from lazyfs.snapshotter.daemon import SnapshotterConfig
from lazyfs.snapshotter.remount import RemountPolicy

DEFAULT_CONFIG_PATH = "/etc/lazyfs/config.toml"
DEFAULT_ADDRESS = "/run/lazyfs/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/lazyfs-snapshotter"


class ConfigError(LazyfsError):
    """A configuration file, or an option that overrides one of its keys, is not usable."""


# Where a key's value goes: `part.field`, the part one of these dataclasses (a field of the
# snapshotter's configuration, but for itself and the image service's).
PARTS: dict[str, type] = {
    "snapshotter": SnapshotterConfig,
    "registry": RegistryOptions,
    "disk_cache": DiskCacheOptions,
    "limits": LayerLimits,
    "tuning": ImageTuning,
    "low_speed": SpeedLimit,
    "remount": RemountPolicy,
    "image_service": ImageServiceConfig,
}


@dataclass(frozen=True)
class Key:
    """One key of the file: `[section] name`, its kind, the option that overrides it (an
    `--no-...` option sets a boolean to false), where its value goes (`part.field` of
    PARTS; a part alone: a boolean that turns the part off) and what it means, with its
    default; a number's `minimum`."""

    section: str
    name: str
    kind: Kind
    option: str
    goes_to: str
    help: str
    default: str = ""
    minimum: int | None = None

    @property
    def id(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def label(self) -> str:
        return f"[{self.section}] {self.name}"

    @property
    def value_name(self) -> str:
        """What a value looks like, in README's table."""
        return self.kind.name.format(minimum=self.minimum)

    def check(self, value: object) -> Any:
        """`value` as its dataclass takes it. Raises Expected."""
        checked = self.kind.check(value)
        if self.minimum is not None and checked < self.minimum:
            assert self.kind.too_small is not None, self.id
            raise Expected(self.kind.too_small(self.minimum))
        return checked


SCHEMA: tuple[Key, ...] = (
    Key("snapshotter", "address", PATH, "--address", "snapshotter.address",
        "the unix socket containerd's proxy plugin connects to", DEFAULT_ADDRESS),
    Key("snapshotter", "root", PATH, "--root", "snapshotter.root",
        "snapshots, layer mounts and the metadata database", DEFAULT_ROOT),
    Key("registry", "mirrors", MIRRORS, "--mirror", "registry.mirrors",
        "tried first, in order, for manifests and blobs (content is checked against digests "
        "either way)", "none"),
    Key("registry", "plain_http", HOSTS, "--plain-http", "registry.plain_http",
        "registries and mirrors spoken to in plain HTTP (every other one in HTTPS)", "none"),
    Key("registry", "credentials_file", PATH, "--credentials-file",
        "registry.credentials_file",
        "registry credentials in the form of `docker login`'s config.json (`auths`)",
        "$DOCKER_CONFIG/config.json, else ~/.docker/config.json"),
    Key("cache", "size", SIZE, "--cache-size", "snapshotter.cache_size_bytes",
        "decoded chunks in memory, shared by all layers", "256M", minimum=1),
    Key("cache", "disk", BOOLEAN, "--no-disk-cache", "disk_cache",
        "keep verified data on disk, shared with every lazyfs of the machine", "true"),
    Key("cache", "dir", PATH, "--cache-dir", "disk_cache.directory", "the disk cache",
        "$LAZYFS_CACHE_DIR, else /var/cache/lazyfs"),
    Key("cache", "disk_size", SIZE, "--disk-cache-size", "disk_cache.size_bytes",
        "least recently used data beyond it is evicted from the disk cache",
        "a tenth of the free space, at most 20G"),
    Key("limits", "connections_per_layer", COUNT, "--connections-per-layer",
        "limits.http_connections",
        "HTTP connections of one layer to its registry or mirror", "8", minimum=1),
    Key("limits", "fetches_per_layer", COUNT, "--fetches-per-layer", "limits.parallel_fetches",
        "requests of one layer in flight, at most connections_per_layer", "4", minimum=1),
    Key("limits", "decode_threads", COUNT, "--decode-threads", "limits.decode_threads",
        "threads that decompress and verify, for all layers", "one per CPU, at least 2",
        minimum=1),
    Key("timeouts", "read_timeout", SECONDS, "--read-timeout", "tuning.read_timeout_s",
        "a read returns its bytes or fails with EIO within this long", "30"),
    Key("timeouts", "low_speed_limit", SIZE, "--low-speed-limit", "low_speed.bytes_per_s",
        "a fetch receiving less than this many bytes a second for low_speed_time is "
        "abandoned and retried", "8K"),
    Key("timeouts", "low_speed_time", SECONDS, "--low-speed-time", "low_speed.time_s",
        "see low_speed_limit", "10"),
    Key("timeouts", "remount_retries", COUNT, "--remount-retries", "remount.attempts",
        "background retries of a layer that cannot be mounted again at start-up", "8",
        minimum=0),
    Key("timeouts", "remount_max_delay", SECONDS, "--remount-max-delay",
        "remount.max_delay_s",
        "longest wait between two of those retries (they start a second apart and "
        "double)", "60"),
    Key("metrics", "address", HOST_PORT, "--metrics-address", "snapshotter.metrics_address",
        "serve Prometheus metrics there", "none"),
    Key("prefetch", "enabled", BOOLEAN, "--no-prefetch", "snapshotter.prefetch",
        "replay the prefetch lists layers carry, in the background once mounted", "true"),
    Key("image_service", "address", PATH, "--image-service-address", "image_service.address",
        "serve CRI's image service on this unix socket, for kubelet's "
        "--image-service-endpoint (containerd 1.6 and 1.7)", "none"),
    Key("image_service", "containerd_address", PATH, "--containerd-address",
        "image_service.containerd_address",
        "containerd's socket, whose CRI plugin the image service works with (needed with "
        "address)", "none"),
    Key("image_service", "namespace", NAME, "--image-service-namespace",
        "image_service.namespace",
        "the containerd namespace the CRI plugin keeps its images in", CRI_NAMESPACE),
)
KEYS: dict[str, Key] = {key.id: key for key in SCHEMA}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(key.section for key in SCHEMA))
# A boolean key that its option (`--no-...`) sets to false.
NEGATED = {key.id for key in SCHEMA if key.option.startswith("--no-")}


@dataclass(frozen=True)
class Setting:
    """A key's value and where it came from: `where` starts an error about it
    (`FILE: [section] key` or `--option TEXT`), `label` names it in another's error."""

    value: Any
    where: str
    label: str
    from_file: bool


def _shown(value: object) -> str:
    """A value as TOML writes it (near enough: dates and tables come out as JSON would)."""
    return json.dumps(value, default=str, ensure_ascii=False)


def settings_of_document(document: Mapping[str, Any], origin: str) -> dict[str, Setting]:
    """The settings of a parsed TOML document read from `origin` (named in errors).
    Raises ConfigError for an unknown section or key and for a value not of its kind."""
    settings: dict[str, Setting] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            owners = [f"[{key.section}]" for key in SCHEMA if key.name == section]
            hint = (f"it belongs in {owners[0]}" if len(owners) == 1
                    else f"it belongs in one of {', '.join(owners)}" if owners
                    else f"sections: {', '.join(f'[{name}]' for name in SECTIONS)}")
            raise ConfigError(f"{origin}: {section}: unknown key outside any section ({hint})")
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: [{section}]: unknown section (known: "
                              f"{', '.join(SECTIONS)})")
        for name, value in table.items():
            key = KEYS.get(f"{section}.{name}")
            if key is None:
                known = ", ".join(key.name for key in SCHEMA if key.section == section)
                raise ConfigError(f"{origin}: [{section}] {name}: unknown key (known: {known})")
            where = f"{origin}: {key.label}"
            try:
                checked = key.check(value)
            except Expected as exc:
                got = value if exc.got is None else exc.got
                raise ConfigError(f"{where}: expected {exc.what}, got {_shown(got)}") from None
            settings[key.id] = Setting(checked, where, key.label, from_file=True)
    _check_together(settings)
    return settings


def settings_of_flags(given: Mapping[str, Any]) -> dict[str, Setting]:
    """The settings of the options given on the command line, by key id: an option's text
    (a list of texts for a repeatable one, True for an `--no-...` one). Relative paths are
    made absolute. Raises ConfigError naming the option and its text."""
    settings: dict[str, Setting] = {}
    for key_id, raw in given.items():
        key = KEYS[key_id]
        if key_id in NEGATED:
            settings[key_id] = Setting(not raw, key.option, key.option, from_file=False)
            continue
        texts = raw if isinstance(raw, list) else [raw]
        where = f"{key.option} {' '.join(map(shlex.quote, texts))}"
        try:
            checked = key.check(raw if key.kind.parse is None else key.kind.parse(raw))
        except Expected as exc:
            if exc.got is not None:
                where = f"{key.option} {shlex.quote(str(exc.got))}"
            raise ConfigError(f"{where}: expected {exc.what}") from None
        settings[key_id] = Setting(checked, where, key.option, from_file=False)
    _check_together(settings)
    return settings


# A key given on the command line overrides these keys of the file too: they would
# contradict it (a disk cache directory given turns a disk cache the file turns off on).
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "cache.disk": ("cache.dir", "cache.disk_size"),
    "cache.dir": ("cache.disk",),
    "cache.disk_size": ("cache.disk",),
}


def merge(file: Mapping[str, Setting], flags: Mapping[str, Setting]) -> dict[str, Setting]:
    """The file's settings with the command line's in their place (and in the place of
    those they would contradict). Raises ConfigError when what is left does not agree."""
    merged = dict(file)
    for key_id in flags:
        for other in _OVERRIDES.get(key_id, ()):
            if other not in flags:
                merged.pop(other, None)
    merged.update(flags)
    _check_together(merged)
    _check_complete(merged)
    return merged


def _check_together(settings: Mapping[str, Setting]) -> None:
    disk = settings.get("cache.disk")
    if disk is not None and not disk.value:
        for key_id in ("cache.dir", "cache.disk_size"):
            if key_id in settings:
                raise ConfigError(f"{settings[key_id].where}: not with "
                                  f"{_assignment(disk)}")
    connections = settings.get("limits.connections_per_layer")
    fetches = settings.get("limits.fetches_per_layer")
    limit = LayerLimits().http_connections if connections is None else connections.value
    if fetches is not None and fetches.value > limit:
        than = (f"{connections.label} ({limit})" if connections is not None
                else f"the {limit} connections of a layer")
        raise ConfigError(f"{fetches.where}: more fetches in flight than {than}")


def _check_complete(settings: Mapping[str, Setting]) -> None:
    """Keys that need another, checked once the file's and the options' are merged."""
    address = settings.get("image_service.address")
    if address is None:
        for key_id in ("image_service.containerd_address", "image_service.namespace"):
            if key_id in settings:
                raise ConfigError(f"{settings[key_id].where}: only used with "
                                  f"{_name_of('image_service.address', settings[key_id])}")
    elif "image_service.containerd_address" not in settings:
        needed = _name_of("image_service.containerd_address", address)
        raise ConfigError(f"{address.where}: needs {needed} (containerd's socket, whose CRI "
                          "plugin runs the pods)")


def _name_of(key_id: str, beside: Setting) -> str:
    """How to name the key `key_id` in an error about `beside`: as its file does, or its
    option."""
    key = KEYS[key_id]
    return key.label if beside.from_file else key.option


def _assignment(setting: Setting) -> str:
    return f"{setting.label} = {_shown(setting.value)}" if setting.from_file else setting.label


def _fields_of(settings: Mapping[str, Setting], part: str) -> dict[str, Any]:
    """The fields of the dataclass `part` (of PARTS) that `settings` give, by name."""
    fields = {}
    for key_id, setting in settings.items():
        goes_to, _, field = KEYS[key_id].goes_to.partition(".")
        if goes_to == part and field:
            fields[field] = setting.value
    return fields


def snapshotter_config(settings: Mapping[str, Setting], *,
                       credentials: Credentials | None = None,
                       insecure: bool = False) -> SnapshotterConfig:
    """The SnapshotterConfig of `settings` (checked already), every key not given at its
    dataclass's default; `credentials` and `insecure` are those of --creds and
    --insecure-registry, which have no key (a password belongs in a credentials file).
    The read timeout also bounds what resolving an image asks its registry, as the
    commands' --read-timeout does."""
    tuning = ImageTuning(**_fields_of(settings, "tuning"))
    registry = RegistryOptions(credentials, insecure, deadline_s=tuning.read_timeout_s,
                               **_fields_of(settings, "registry"))
    disk = settings.get("cache.disk")
    disk_cache = (DiskCacheOptions(**_fields_of(settings, "disk_cache"))
                  if disk is None or disk.value else None)
    top = {"address": DEFAULT_ADDRESS, "root": DEFAULT_ROOT, **_fields_of(settings, "snapshotter")}
    return SnapshotterConfig(
        **top, registry=registry, disk_cache=disk_cache, tuning=tuning,
        low_speed=SpeedLimit(**_fields_of(settings, "low_speed")),
        remount=RemountPolicy(**_fields_of(settings, "remount")),
        limits=_limits(_fields_of(settings, "limits")),
    )


def _limits(values: dict[str, Any]) -> LayerLimits:
    """LayerLimits of `values`; fewer connections than the default fetches in flight make
    as many fetches."""
    connections = values.get("http_connections", LayerLimits.http_connections)
    values.setdefault("parallel_fetches", min(LayerLimits.parallel_fetches, connections))
    return LayerLimits(**values)


def image_service_config(settings: Mapping[str, Setting]) -> ImageServiceConfig | None:
    """The ImageServiceConfig of `settings` (merged already), None without an address."""
    if "image_service.address" not in settings:
        return None
    return ImageServiceConfig(**_fields_of(settings, "image_service"))


_POSITION = re.compile(
    r"^(?P<message>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$")


def parse_document(text: str, origin: str) -> dict[str, Any]:
    """The TOML document `text` of `origin`. Raises ConfigError with the line and column of
    a syntax error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _POSITION.match(str(exc))
        if found is None:
            raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
        place = ("at the end" if found["line"] is None
                 else f"line {found['line']}, column {found['column']}")
        message = found["message"][:1].lower() + found["message"][1:]
        raise ConfigError(f"{origin}: {place}: {message} (not valid TOML)") from None


def read_document(path: str) -> dict[str, Any]:
    """The TOML document of the file `path`: the one place a configuration is read.
    Raises ConfigError."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_document(text, path)


def config_path(given: str | None, default: str = DEFAULT_CONFIG_PATH) -> str | None:
    """The file to read: the one given, else `default` if it exists, else none."""
    if given is not None:
        return given
    return default if os.path.exists(default) else None


def load_settings(path: str | None, flags: Mapping[str, Any]) -> dict[str, Setting]:
    """The settings of the file `path` (none: no file), those of the options `flags` (as
    `settings_of_flags` takes them) in their place. Raises ConfigError."""
    from_file = {} if path is None else settings_of_document(read_document(path), path)
    settings = merge(from_file, settings_of_flags(flags))
    _check_readable(settings.get("registry.credentials_file"))
    return settings


def _check_readable(setting: Setting | None) -> None:
    """A file the settings name can be read, now: not at the first pull that needs it."""
    if setting is None:
        return
    try:
        with open(setting.value, "rb"):
            pass
    except OSError as exc:
        shown = f" {setting.value}" if setting.from_file else ""
        raise ConfigError(f"{setting.where}:{shown}: {exc.strerror}") from None
