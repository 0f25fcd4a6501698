"""The configuration file of `lazyfs snapshotter`: TOML, `--config FILE`, else
/etc/lazyfs/config.toml when it exists.

`SCHEMA` is the one table of what a file may hold: per key its section, the kind of value
(which checks it, from the file and from the command line alike), the option that overrides
it and what it means; README's table of keys is checked against it. A file and the command
line each give `Setting`s by key (`settings_of_document`, `settings_of_flags`), the flags'
replace the file's (`merge`), and `snapshotter_config` and `image_service_config` make of
them the frozen dataclasses the daemon and the CRI image service take (defaults are theirs).
All of it is pure: `read_document` is the one place a file is read. Every error is a
ConfigError of one line naming the file, section and key (or the option) and what was
expected.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.cli import UserError
from lazyfs.cli.sizes import size_of
from lazyfs.cri.image_service import CRI_NAMESPACE, ImageServiceConfig
from lazyfs.fetch.base import SpeedLimit
from lazyfs.fetch.registry_auth import Credentials
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.reference import InvalidReferenceError, validate_registry
from lazyfs.layer.tuning import DEFAULT_READ_TIMEOUT_S, ImageTuning
from lazyfs.mount.host import LayerLimits
from lazyfs.snapshotter.daemon import SnapshotterConfig
from lazyfs.snapshotter.remount import RemountPolicy

DEFAULT_CONFIG_PATH = "/etc/lazyfs/config.toml"
DEFAULT_ADDRESS = "/run/lazyfs/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/lazyfs-snapshotter"


class ConfigError(UserError):
    """A configuration file, or an option that overrides one of its keys, is not usable."""


class Expected(Exception):
    """A value is not of its kind: `what` it should have been; `got` the part at fault
    (an item of a list), else the whole value."""

    def __init__(self, what: str, got: object = None) -> None:
        super().__init__(what)
        self.what = what
        self.got = got


@dataclass(frozen=True)
class Kind:
    """A kind of value: `check` turns a TOML value into the value the dataclasses take,
    raising Expected; `parse` turns an option's text into a TOML value first (None: the
    text is the value). `name` says what a value looks like, in README's table."""

    name: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any] | None = None


def _size(minimum: int) -> Kind:  # minimum: 0 or 1
    def check(value: object) -> int:
        size = (value if isinstance(value, int) and not isinstance(value, bool)
                else size_of(value) if isinstance(value, str) else None)
        if size is None or size < 0:
            raise Expected('a size like "1G"')
        if size < minimum:
            raise Expected("a size more than 0")
        return size

    return Kind('size ("64K", "256M", "1G" or bytes)', check)


def _seconds(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Expected("a number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise Expected("a number of seconds, more than 0")
    return float(value)


def _number_text(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _count(minimum: int) -> Kind:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Expected("a whole number")
        if value < minimum:
            raise Expected(f"a whole number, {minimum} or more")
        return value

    def parse(text: str) -> object:
        try:
            return int(text)
        except ValueError:
            return text

    return Kind(f"whole number, {minimum} or more", check, parse)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Expected("true or false")
    return value


def _path(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise Expected("an absolute path")
    return os.path.normpath(value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or value.strip() != value:
        raise Expected("a name")
    return value


def _host(value: object) -> str:
    if isinstance(value, str):
        try:
            return validate_registry(value)
        except InvalidReferenceError:
            raise Expected("host[:port]", value) from None
    raise Expected("host[:port]", value)


def _mirror(value: object) -> str:
    if isinstance(value, str):
        scheme, sep, host = value.partition("://")
        if not sep or scheme in ("http", "https"):
            try:
                validate_registry(host.rstrip("/") if sep else value)
            except InvalidReferenceError:
                raise Expected("host[:port] or http(s)://host[:port]", value) from None
            return value
    raise Expected("host[:port] or http(s)://host[:port]", value)


def _list_of(item: Callable[[object], str], what: str) -> Callable[[object], tuple[str, ...]]:
    def check(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise Expected(f"a list of {what}")
        return tuple(item(element) for element in value)

    return check


def _host_port(value: object) -> tuple[str, int]:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return host.strip("[]") or "127.0.0.1", int(port)
    raise Expected('HOST:PORT, like "127.0.0.1:9180"')


SIZE = _size(0)
POSITIVE_SIZE = _size(1)
SECONDS = Kind("seconds (a number)", _seconds, _number_text)
COUNT = _count(0)
POSITIVE_COUNT = _count(1)
BOOLEAN = Kind("true or false", _boolean)
PATH = Kind("absolute path", _path)
NAME = Kind("name", _name)
HOSTS = Kind("list of host[:port]", _list_of(_host, "host[:port]"))
MIRRORS = Kind("list of host[:port] or http(s)://host[:port]",
               _list_of(_mirror, "host[:port] or http(s)://host[:port]"))
HOST_PORT = Kind("HOST:PORT", _host_port)


@dataclass(frozen=True)
class Key:
    """One key of the file: `[section] name`, its kind, the option that overrides it (an
    `--no-...` option sets a boolean to false) and what it means, with its default."""

    section: str
    name: str
    kind: Kind
    option: str
    help: str
    default: str = ""

    @property
    def id(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def label(self) -> str:
        return f"[{self.section}] {self.name}"


SCHEMA: tuple[Key, ...] = (
    Key("snapshotter", "address", PATH, "--address",
        "the unix socket containerd's proxy plugin connects to", DEFAULT_ADDRESS),
    Key("snapshotter", "root", PATH, "--root",
        "snapshots, layer mounts and the metadata database", DEFAULT_ROOT),
    Key("registry", "mirrors", MIRRORS, "--mirror",
        "tried first, in order, for manifests and blobs (content is checked against digests "
        "either way)", "none"),
    Key("registry", "plain_http", HOSTS, "--plain-http",
        "registries and mirrors spoken to in plain HTTP (every other one in HTTPS)", "none"),
    Key("registry", "credentials_file", PATH, "--credentials-file",
        "registry credentials in the form of `docker login`'s config.json (`auths`)",
        "$DOCKER_CONFIG/config.json, else ~/.docker/config.json"),
    Key("cache", "size", POSITIVE_SIZE, "--cache-size",
        "decoded chunks in memory, shared by all layers", "256M"),
    Key("cache", "disk", BOOLEAN, "--no-disk-cache",
        "keep verified data on disk, shared with every lazyfs of the machine", "true"),
    Key("cache", "dir", PATH, "--cache-dir", "the disk cache",
        "$LAZYFS_CACHE_DIR, else /var/cache/lazyfs"),
    Key("cache", "disk_size", SIZE, "--disk-cache-size",
        "least recently used data beyond it is evicted from the disk cache",
        "a tenth of the free space, at most 20G"),
    Key("limits", "connections_per_layer", POSITIVE_COUNT, "--connections-per-layer",
        "HTTP connections of one layer to its registry or mirror", "8"),
    Key("limits", "fetches_per_layer", POSITIVE_COUNT, "--fetches-per-layer",
        "requests of one layer in flight, at most connections_per_layer", "4"),
    Key("limits", "decode_threads", POSITIVE_COUNT, "--decode-threads",
        "threads that decompress and verify, for all layers", "one per CPU, at least 2"),
    Key("timeouts", "read_timeout", SECONDS, "--read-timeout",
        "a read returns its bytes or fails with EIO within this long", "30"),
    Key("timeouts", "low_speed_limit", SIZE, "--low-speed-limit",
        "a fetch receiving less than this many bytes a second for low_speed_time is "
        "abandoned and retried", "8K"),
    Key("timeouts", "low_speed_time", SECONDS, "--low-speed-time",
        "see low_speed_limit", "10"),
    Key("timeouts", "remount_retries", COUNT, "--remount-retries",
        "background retries of a layer that cannot be mounted again at start-up", "8"),
    Key("timeouts", "remount_max_delay", SECONDS, "--remount-max-delay",
        "longest wait between two of those retries (they start a second apart and "
        "double)", "60"),
    Key("metrics", "address", HOST_PORT, "--metrics-address",
        "serve Prometheus metrics there", "none"),
    Key("prefetch", "enabled", BOOLEAN, "--no-prefetch",
        "replay the prefetch lists layers carry, in the background once mounted", "true"),
    Key("image_service", "address", PATH, "--image-service-address",
        "serve CRI's image service on this unix socket, for kubelet's "
        "--image-service-endpoint (containerd 1.6 and 1.7)", "none"),
    Key("image_service", "containerd_address", PATH, "--containerd-address",
        "containerd's socket, whose CRI plugin the image service works with (needed with "
        "address)", "none"),
    Key("image_service", "namespace", NAME, "--image-service-namespace",
        "the containerd namespace the CRI plugin keeps its images in", CRI_NAMESPACE),
)
KEYS: dict[str, Key] = {key.id: key for key in SCHEMA}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(key.section for key in SCHEMA))
# A boolean key that its option (`--no-...`) sets to false.
NEGATED = {"cache.disk", "prefetch.enabled"}


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
                checked = key.kind.check(value)
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
        value: Any = raw
        if key.kind is PATH:
            value = os.path.abspath(raw)
        elif key.kind.parse is not None:
            value = key.kind.parse(raw)
        try:
            checked = key.kind.check(value)
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


def snapshotter_config(settings: Mapping[str, Setting], *,
                       credentials: Credentials | None = None,
                       insecure: bool = False) -> SnapshotterConfig:
    """The SnapshotterConfig of `settings` (checked already), every key not given at its
    dataclass's default; `credentials` and `insecure` are those of --creds and
    --insecure-registry, which have no key (a password belongs in a credentials file).
    The read timeout also bounds what resolving an image asks its registry, as the
    commands' --read-timeout does."""
    def value(key_id: str, default: Any = None) -> Any:
        setting = settings.get(key_id)
        return default if setting is None else setting.value

    def given(names: Mapping[str, str]) -> dict[str, Any]:
        return {field: settings[key_id].value for key_id, field in names.items()
                if key_id in settings}

    disk_cache = None
    if value("cache.disk", True):
        disk_cache = DiskCacheOptions(**given({"cache.dir": "directory",
                                               "cache.disk_size": "size_bytes"}))
    return SnapshotterConfig(
        address=value("snapshotter.address", DEFAULT_ADDRESS),
        root=value("snapshotter.root", DEFAULT_ROOT),
        registry=RegistryOptions(
            credentials, insecure, value("registry.mirrors", ()),
            deadline_s=value("timeouts.read_timeout", DEFAULT_READ_TIMEOUT_S),
            **given({"registry.plain_http": "plain_http",
                     "registry.credentials_file": "credentials_file"})),
        **given({"cache.size": "cache_size_bytes", "metrics.address": "metrics_address",
                 "prefetch.enabled": "prefetch"}),
        remount=RemountPolicy(**given({"timeouts.remount_retries": "attempts",
                                       "timeouts.remount_max_delay": "max_delay_s"})),
        disk_cache=disk_cache,
        tuning=ImageTuning(**given({"timeouts.read_timeout": "read_timeout_s"})),
        low_speed=SpeedLimit(**given({"timeouts.low_speed_limit": "bytes_per_s",
                                      "timeouts.low_speed_time": "time_s"})),
        limits=_limits(given({"limits.connections_per_layer": "http_connections",
                              "limits.fetches_per_layer": "parallel_fetches",
                              "limits.decode_threads": "decode_threads"})),
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
    return ImageServiceConfig(**{field: settings[key_id].value for key_id, field in (
        ("image_service.address", "address"),
        ("image_service.containerd_address", "containerd_address"),
        ("image_service.namespace", "namespace")) if key_id in settings})


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
