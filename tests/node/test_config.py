"""The configuration file of `lazyfs snapshotter`: every key reaches the dataclass field it
names (one that exists), an option overrides its key, every kind of bad input is one line
naming the file and the key (or the option), and the default file is read only when it
exists."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from lazyfs.cli import build_parser
from lazyfs.cli.snapshotter import config_of, flags_given, settings_of
from lazyfs.cri.image_service import ImageServiceConfig
from lazyfs.node.config import (
    DEFAULT_ADDRESS,
    DEFAULT_ROOT,
    KEYS,
    NEGATED,
    PARTS,
    SCHEMA,
    ConfigError,
    config_path,
    image_service_config,
    parse_document,
    settings_of_document,
    snapshotter_config,
)
from lazyfs.snapshotter.daemon import SnapshotterConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Configs:
    """What the settings make: the snapshotter's configuration (whose fields it shows) and
    the image service's."""

    snapshotter: SnapshotterConfig
    image_service: ImageServiceConfig | None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.snapshotter, name)


Getter = Callable[[Configs], Any]


def _disk(field: str) -> Getter:
    return lambda config: getattr(config.disk_cache, field)


def _images(field: str) -> Getter:
    return lambda config: config.image_service and getattr(config.image_service, field)


# key: (its value in a file, what the config then holds, an option's text (a list for a
# repeatable option, None for an --no-... one), what the config then holds, where it is).
# Paths under {tmp} are made (credentials files must be readable).
SAMPLES: dict[str, tuple[Any, Any, Any, Any, Getter]] = {
    "snapshotter.address": ("/run/a/s.sock", "/run/a/s.sock", "/run/b/s.sock", "/run/b/s.sock",
                            lambda c: c.address),
    "snapshotter.root": ("/srv/a", "/srv/a", "/srv/b", "/srv/b", lambda c: c.root),
    "registry.mirrors": (["m1.test:5000", "https://m2.test"], ("m1.test:5000", "https://m2.test"),
                         ["m3.test", "http://m4.test:80"], ("m3.test", "http://m4.test:80"),
                         lambda c: c.registry.mirrors),
    "registry.plain_http": (["m1.test:5000"], ("m1.test:5000",), ["m3.test", "127.0.0.1:5000"],
                            ("m3.test", "127.0.0.1:5000"), lambda c: c.registry.plain_http),
    "registry.credentials_file": ("{tmp}/a.json", "{tmp}/a.json", "{tmp}/b.json",
                                  "{tmp}/b.json", lambda c: c.registry.credentials_file),
    "cache.size": ("1G", 1 << 30, "64M", 64 << 20, lambda c: c.cache_size_bytes),
    "cache.disk": (True, True, None, False, lambda c: c.disk_cache is not None),
    "cache.dir": ("/var/cache/a", "/var/cache/a", "/var/cache/b", "/var/cache/b",
                  _disk("directory")),
    "cache.disk_size": ("20G", 20 << 30, "5G", 5 << 30, _disk("size_bytes")),
    "limits.connections_per_layer": (16, 16, "12", 12, lambda c: c.limits.http_connections),
    "limits.fetches_per_layer": (2, 2, "3", 3, lambda c: c.limits.parallel_fetches),
    "limits.decode_threads": (3, 3, "5", 5, lambda c: c.limits.decode_threads),
    "timeouts.read_timeout": (5, 5.0, "7.5", 7.5, lambda c: c.tuning.read_timeout_s),
    "timeouts.low_speed_limit": ("16K", 16 << 10, "1M", 1 << 20,
                                 lambda c: c.low_speed.bytes_per_s),
    "timeouts.low_speed_time": (20, 20.0, "3", 3.0, lambda c: c.low_speed.time_s),
    "timeouts.remount_retries": (3, 3, "0", 0, lambda c: c.remount.attempts),
    "timeouts.remount_max_delay": (10.5, 10.5, "2", 2.0, lambda c: c.remount.max_delay_s),
    "metrics.address": ("127.0.0.1:9180", ("127.0.0.1", 9180), ":9200", ("127.0.0.1", 9200),
                        lambda c: c.metrics_address),
    "prefetch.enabled": (True, True, None, False, lambda c: c.prefetch),
    "image_service.address": ("/run/a/image.sock", "/run/a/image.sock", "/run/b/image.sock",
                              "/run/b/image.sock", _images("address")),
    "image_service.containerd_address": ("/run/a/c.sock", "/run/a/c.sock", "/run/b/c.sock",
                                         "/run/b/c.sock", _images("containerd_address")),
    "image_service.namespace": ("pods", "pods", "pods2", "pods2", _images("namespace")),
}
# The keys a key is given with in a file: it is not used, or not usable, without them.
COMPANIONS = {
    "image_service.address": ["image_service.containerd_address"],
    "image_service.containerd_address": ["image_service.address"],
    "image_service.namespace": ["image_service.address", "image_service.containerd_address"],
}


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # What DiskCacheOptions() defaults to, whoever runs the tests.
    monkeypatch.setenv("LAZYFS_CACHE_DIR", "/var/cache/test-disk")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return str(value)


def _document(key_ids: list[str], tmp: Path) -> str:
    lines = []
    for section in dict.fromkeys(KEYS[key_id].section for key_id in key_ids):
        lines.append(f"[{section}]")
        lines += [f"{KEYS[key_id].name} = {_toml(_in(tmp, SAMPLES[key_id][0]))}"
                  for key_id in key_ids if KEYS[key_id].section == section]
    return "\n".join(lines) + "\n"


def _in(tmp: Path, value: Any) -> Any:
    """`value` with {tmp} in its texts made `tmp` (and such files made)."""
    if isinstance(value, str) and "{tmp}" in value:
        path = Path(value.format(tmp=tmp))
        path.write_text('{"auths": {}}')
        return str(path)
    if isinstance(value, (list, tuple)):
        return type(value)(_in(tmp, item) for item in value)
    return value


def _argv(key_id: str, tmp: Path) -> list[str]:
    option, text = KEYS[key_id].option, _in(tmp, SAMPLES[key_id][2])
    if text is None:
        return [option]
    if isinstance(text, list):
        return [arg for item in text for arg in (option, item)]
    return [option, text]


def _config(tmp: Path, document: str, *argv: str) -> Configs:
    path = tmp / "config.toml"
    path.write_text(document)
    args = build_parser("snapshotter").parse_args(["snapshotter", "--config", str(path), *argv])
    settings = settings_of(args, default_path=str(tmp / "absent.toml"))
    return Configs(config_of(args, settings=settings), image_service_config(settings))


@pytest.mark.parametrize("key_id", sorted(KEYS))
def test_every_key_has_a_sample_and_an_option_of_the_snapshotter(key_id: str,
                                                                  tmp_path: Path) -> None:
    assert set(SAMPLES) == set(KEYS)
    args = build_parser("snapshotter").parse_args(["snapshotter", *_argv(key_id, tmp_path)])
    assert flags_given(args).keys() == {key_id}


@pytest.mark.parametrize("key_id", sorted(KEYS))
def test_every_key_goes_to_a_field_of_its_dataclass(key_id: str) -> None:
    part, _, field = KEYS[key_id].goes_to.partition(".")
    assert part in PARTS
    if field:
        assert field in {each.name for each in fields(PARTS[part])}
    else:  # a part turned off: a boolean
        assert KEYS[key_id].kind.name == "true or false"


@pytest.mark.parametrize("section", sorted({key.section for key in SCHEMA}))
def test_each_section_reaches_its_fields_and_no_other(section: str, tmp_path: Path) -> None:
    key_ids = [key.id for key in SCHEMA if key.section == section]
    config = _config(tmp_path, _document(key_ids, tmp_path))
    default = _config(tmp_path, "")
    for key_id, (_, expected, _, _, get) in SAMPLES.items():
        wanted = _in(tmp_path, expected) if key_id in key_ids else get(default)
        assert get(config) == wanted, key_id


def test_the_defaults_are_the_dataclasses(tmp_path: Path) -> None:
    config = _config(tmp_path, "")
    assert config.snapshotter == snapshotter_config({}) and config.image_service is None
    assert (config.address, config.root) == (DEFAULT_ADDRESS, DEFAULT_ROOT)
    assert config.disk_cache is not None and config.disk_cache.directory == "/var/cache/test-disk"
    # A value equal to the default gives the very same configuration.
    same = _config(tmp_path, '[cache]\nsize = "256M"\n[timeouts]\nread_timeout = 30\n'
                   'remount_retries = 8\n[limits]\nconnections_per_layer = 8\n')
    assert same == config
    images = _config(tmp_path, '[image_service]\naddress = "/run/i.sock"\n'
                     'containerd_address = "/run/c.sock"\n').image_service
    assert images == ImageServiceConfig("/run/i.sock", "/run/c.sock")


@pytest.mark.parametrize("key_id", sorted(KEYS))
def test_an_option_overrides_its_key(key_id: str, tmp_path: Path) -> None:
    document = _document([key_id, *COMPANIONS.get(key_id, [])], tmp_path)
    config = _config(tmp_path, document, *_argv(key_id, tmp_path))
    _, _, _, expected, get = SAMPLES[key_id]
    assert get(config) == _in(tmp_path, expected)


def test_options_leave_the_other_keys_of_the_file(tmp_path: Path) -> None:
    document = _document(sorted(KEYS.keys() - NEGATED - {"cache.dir", "cache.disk_size"}),
                         tmp_path)
    config = _config(tmp_path, document, "--cache-size", "2G", "--no-prefetch")
    assert config.cache_size_bytes == 2 << 30 and not config.prefetch
    assert config.remount.attempts == 3 and config.limits.decode_threads == 3
    assert config.registry.mirrors == ("m1.test:5000", "https://m2.test")


def test_a_disk_cache_option_overrides_the_file_turning_it_off(tmp_path: Path) -> None:
    off = "[cache]\ndisk = false\n"
    assert _config(tmp_path, off).disk_cache is None
    on = _config(tmp_path, off, "--cache-dir", "/var/cache/c")
    assert on.disk_cache is not None and on.disk_cache.directory == "/var/cache/c"
    sized = '[cache]\ndir = "/var/cache/a"\ndisk_size = "1G"\n'
    assert _config(tmp_path, sized, "--no-disk-cache").disk_cache is None

def test_fewer_connections_make_as_many_fetches(tmp_path: Path) -> None:
    limits = _config(tmp_path, "", "--connections-per-layer", "2").limits
    assert (limits.http_connections, limits.parallel_fetches) == (2, 2)
    limits = _config(tmp_path, "[limits]\nconnections_per_layer = 16\n").limits
    assert (limits.http_connections, limits.parallel_fetches) == (16, 4)


def test_the_read_timeout_is_also_the_deadline_of_resolving_an_image(tmp_path: Path) -> None:
    assert _config(tmp_path, "").registry.deadline_s == 30.0
    assert _config(tmp_path, "[timeouts]\nread_timeout = 5\n").registry.deadline_s == 5.0
    assert _config(tmp_path, "", "--read-timeout", "7.5").registry.deadline_s == 7.5


def test_creds_and_insecure_registry_are_options_only(tmp_path: Path) -> None:
    config = _config(tmp_path, '[registry]\nplain_http = ["m1.test"]\n', "--creds", "alice:pw",
                     "--insecure-registry")
    assert config.registry.credentials is not None
    assert config.registry.credentials.username == "alice"
    assert config.registry.insecure and config.registry.plain_http == ("m1.test",)


ORIGIN = "config.toml"


@pytest.mark.parametrize(("document", "message"), [
    # not TOML: the line and column
    ('[cache]\nsize = \n', "config.toml: line 2, column 8: invalid value (not valid TOML)"),
    ('[cache]\nsize = "1G"\n[cache]\n', "config.toml: line 3, column 7: cannot declare "
     "('cache',) twice (not valid TOML)"),
    ("[cache\n", "config.toml: line 1, column 7: expected ']' at the end of a table "
     "declaration (not valid TOML)"),
    # an unknown section or key
    ("[caches]\nsize = 1\n", "config.toml: [caches]: unknown section (known: snapshotter, "
     "registry, cache, limits, timeouts, metrics, prefetch, image_service)"),
    ("[cache]\nsise = 1\n", "config.toml: [cache] sise: unknown key (known: size, disk, dir, "
     "disk_size)"),
    ("read_timeout = 30\n", "config.toml: read_timeout: unknown key outside any section (it "
     "belongs in [timeouts])"),
    ('address = "/run/s.sock"\n', "config.toml: address: unknown key outside any section (it "
     "belongs in one of [snapshotter], [metrics], [image_service])"),
    ("size2 = 1\n", "config.toml: size2: unknown key outside any section (sections: "
     "[snapshotter], [registry], [cache], [limits], [timeouts], [metrics], [prefetch], "
     "[image_service])"),
    # a wrong type
    ("[cache]\nsize = 12.5\n", 'config.toml: [cache] size: expected a size like "1G", got 12.5'),
    ('[timeouts]\nread_timeout = "30"\n', 'config.toml: [timeouts] read_timeout: expected a '
     'number of seconds, got "30"'),
    ("[cache]\ndisk = 0\n", "config.toml: [cache] disk: expected true or false, got 0"),
    ("[limits]\ndecode_threads = true\n", "config.toml: [limits] decode_threads: expected a "
     "whole number, got true"),
    ('[registry]\nmirrors = "m1.test"\n', "config.toml: [registry] mirrors: expected a list "
     'of host[:port] or http(s)://host[:port], got "m1.test"'),
    ("[cache.disk]\nsize = 1\n", 'config.toml: [cache] disk: expected true or false, got '
     '{"size": 1}'),
    # a bad value
    ("[cache]\nsize = 0\n", "config.toml: [cache] size: expected a size more than 0, got 0"),
    ('[cache]\nsize = "1.5G"\n', 'config.toml: [cache] size: expected a size like "1G", '
     'got "1.5G"'),
    ('[cache]\ndir = "cache"\n', 'config.toml: [cache] dir: expected an absolute path, got '
     '"cache"'),
    ("[timeouts]\nremount_retries = -1\n", "config.toml: [timeouts] remount_retries: expected "
     "a whole number, 0 or more, got -1"),
    ("[timeouts]\nlow_speed_time = 0\n", "config.toml: [timeouts] low_speed_time: expected a "
     "number of seconds, more than 0, got 0"),
    ("[timeouts]\nread_timeout = inf\n", "config.toml: [timeouts] read_timeout: expected a "
     "number of seconds, more than 0, got Infinity"),
    ('[metrics]\naddress = "localhost"\n', 'config.toml: [metrics] address: expected '
     'HOST:PORT, like "127.0.0.1:9180", got "localhost"'),
    ('[registry]\nplain_http = ["ok.test", "not a host"]\n', "config.toml: [registry] "
     'plain_http: expected host[:port], got "not a host"'),
    ('[registry]\nmirrors = ["ftp://m.test"]\n', "config.toml: [registry] mirrors: expected "
     'host[:port] or http(s)://host[:port], got "ftp://m.test"'),
    # keys that contradict each other
    ('[cache]\ndisk = false\ndisk_size = "1G"\n', "config.toml: [cache] disk_size: not with "
     "[cache] disk = false"),
    ("[limits]\nfetches_per_layer = 9\n", "config.toml: [limits] fetches_per_layer: more "
     "fetches in flight than the 8 connections of a layer"),
    ("[limits]\nconnections_per_layer = 2\nfetches_per_layer = 3\n", "config.toml: [limits] "
     "fetches_per_layer: more fetches in flight than [limits] connections_per_layer (2)"),
])
def test_bad_input_is_one_line_naming_the_file_and_key(document: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_of_document(parse_document(document, ORIGIN), ORIGIN)
    assert str(caught.value) == message
    assert "\n" not in message


@pytest.mark.parametrize(("argv", "message"), [
    (["--cache-size", "lots"], '--cache-size lots: expected a size like "1G"'),
    (["--remount-retries", "-1"], "--remount-retries -1: expected a whole number, 0 or more"),
    (["--read-timeout", "soon"], "--read-timeout soon: expected a number of seconds"),
    (["--mirror", "m1.test", "--mirror", "not a host"],
     "--mirror 'not a host': expected host[:port] or http(s)://host[:port]"),
    (["--root", "relative"], None),  # made absolute, as every path option
    (["--no-disk-cache", "--disk-cache-size", "1G"], "--disk-cache-size 1G: not with "
     "--no-disk-cache"),
    (["--fetches-per-layer", "9"], "--fetches-per-layer 9: more fetches in flight than the 8 "
     "connections of a layer"),
    (["--metrics-address", "9180"], '--metrics-address 9180: expected HOST:PORT, like '
     '"127.0.0.1:9180"'),
])
def test_a_bad_option_is_one_line_naming_it(argv: list[str], message: str | None,
                                            tmp_path: Path) -> None:
    if message is None:
        assert _config(tmp_path, "", *argv).root == os.path.abspath(argv[1])
        return
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, "", *argv)
    assert str(caught.value) == message


def test_a_file_and_an_option_that_contradict_name_both(tmp_path: Path) -> None:
    document = "[limits]\nconnections_per_layer = 2\n"
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, document, "--fetches-per-layer", "3")
    assert str(caught.value) == ("--fetches-per-layer 3: more fetches in flight than "
                                 "[limits] connections_per_layer (2)")
    document = "[limits]\nfetches_per_layer = 2\n"
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, document, "--connections-per-layer", "1")
    assert str(caught.value) == (f"{tmp_path}/config.toml: [limits] fetches_per_layer: more "
                                 "fetches in flight than --connections-per-layer (1)")


@pytest.mark.parametrize(("document", "argv", "message"), [
    ('[image_service]\naddress = "/run/i.sock"\n', [], "{config}: [image_service] address: "
     "needs [image_service] containerd_address (containerd's socket, whose CRI plugin runs "
     "the pods)"),
    ("", ["--image-service-address", "/run/i.sock"], "--image-service-address /run/i.sock: "
     "needs --containerd-address (containerd's socket, whose CRI plugin runs the pods)"),
    ('[image_service]\nnamespace = "pods"\n', [], "{config}: [image_service] namespace: only "
     "used with [image_service] address"),
    ("", ["--containerd-address", "/run/c.sock"], "--containerd-address /run/c.sock: only used "
     "with --image-service-address"),
])
def test_a_key_without_the_one_it_needs_is_one_line(document: str, argv: list[str],
                                                    message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, document, *argv)
    assert str(caught.value) == message.format(config=tmp_path / "config.toml")


def test_the_image_service_takes_keys_of_the_file_and_options(tmp_path: Path) -> None:
    configs = _config(tmp_path, '[image_service]\naddress = "/run/i.sock"\n',
                      "--containerd-address", "c.sock")
    assert configs.image_service == ImageServiceConfig("/run/i.sock",
                                                       os.path.abspath("c.sock"))


def test_the_default_file_is_read_only_when_it_exists(tmp_path: Path) -> None:
    default = tmp_path / "config.toml"
    assert config_path(None, str(default)) is None
    assert config_path("/elsewhere.toml", str(default)) == "/elsewhere.toml"
    args = build_parser("snapshotter").parse_args(["snapshotter"])
    assert config_of(args, default_path=str(default)).cache_size_bytes == 256 << 20
    default.write_text('[cache]\nsize = "1G"\n')
    assert config_path(None, str(default)) == str(default)
    assert config_of(args, default_path=str(default)).cache_size_bytes == 1 << 30
    # Another file given: the default is not read at all.
    other = tmp_path / "other.toml"
    other.write_text("")
    given = build_parser("snapshotter").parse_args(["snapshotter", "--config", str(other)])
    assert config_of(given, default_path=str(default)).cache_size_bytes == 256 << 20
    # A broken default file is an error as any other.
    default.write_text("[cache]\nsize = 12.5\n")
    with pytest.raises(ConfigError, match=rf'^{default}: \[cache\] size: expected a size'):
        config_of(args, default_path=str(default))


def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=rf"^{missing}: No such file or directory$"):
        _config_at(missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[cache]\nsize = \"\xff\"\n")
    with pytest.raises(ConfigError, match=rf"^{binary}: not UTF-8 text \(byte 16\)$"):
        _config_at(binary)
    credentials = tmp_path / "config.toml"
    credentials.write_text(f'[registry]\ncredentials_file = "{tmp_path}/none.json"\n')
    with pytest.raises(ConfigError, match=rf"^{credentials}: \[registry\] credentials_file: "
                       rf"{tmp_path}/none.json: No such file or directory$"):
        _config_at(credentials)


def _config_at(path: Path) -> SnapshotterConfig:
    args = build_parser("snapshotter").parse_args(["snapshotter", "--config", str(path)])
    return config_of(args, default_path="/nonexistent/config.toml")


@pytest.mark.root  # the snapshotter refuses to start as another user first
def test_the_command_says_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[snapshotter]\nroot = "{tmp_path}/root"\n[cache]\nsize = 12.5\n')
    result = subprocess.run([sys.executable, "-m", "lazyfs", "snapshotter", "--config",
                             str(path)], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2
    assert result.stderr == (f'lazyfs snapshotter: error: {path}: [cache] size: expected a '
                             'size like "1G", got 12.5\n')
    assert not (tmp_path / "root").exists()
