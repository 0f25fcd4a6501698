"""The kinds of value a key of the configuration file takes: one checker per kind, used for
the file's TOML values and for the options' texts alike. A key's row in the schema
(`config.SCHEMA`) names its kind and, for a number, its minimum."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lazyfs.format.reference import InvalidReferenceError, validate_registry
from lazyfs.sizes import size_of


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
    text is the value). `name` says what a value looks like, in README's table ({minimum}:
    the key's). `too_small`: what a number under a key's minimum should have been."""

    name: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any] | None = None
    too_small: Callable[[int], str] | None = None


def _or_text(convert: Callable[[str], object]) -> Callable[[str], object]:
    """An option's text converted, else the text itself: the check then says what is wrong
    with it."""
    def parse(text: str) -> object:
        try:
            return convert(text)
        except ValueError:
            return text

    return parse


def _size(value: object) -> int:
    size = (value if isinstance(value, int) and not isinstance(value, bool)
            else size_of(value) if isinstance(value, str) else None)
    if size is None or size < 0:
        raise Expected('a size like "1G"')
    return size


def _seconds(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Expected("a number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise Expected("a number of seconds, more than 0")
    return float(value)


def _whole_number(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Expected("a whole number")
    return value


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


_HOST = "host[:port]"
_MIRROR = "host[:port] or http(s)://host[:port]"


def _host(value: object) -> str:
    if isinstance(value, str):
        try:
            return validate_registry(value)
        except InvalidReferenceError:
            pass
    raise Expected(_HOST, value)


def _mirror(value: object) -> str:
    """A registry's `host[:port]`, or a URL's `http(s)://host[:port]`."""
    if isinstance(value, str):
        scheme, sep, host = value.partition("://")
        if not sep or scheme in ("http", "https"):
            try:
                validate_registry(host.rstrip("/") if sep else value)
            except InvalidReferenceError:
                pass
            else:
                return value
    raise Expected(_MIRROR, value)


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


SIZE = Kind('size ("64K", "256M", "1G" or bytes)', _size,
            too_small=lambda minimum: f"a size more than {minimum - 1}")
SECONDS = Kind("seconds (a number)", _seconds, _or_text(float))
COUNT = Kind("whole number, {minimum} or more", _whole_number, _or_text(int),
             too_small=lambda minimum: f"a whole number, {minimum} or more")
BOOLEAN = Kind("true or false", _boolean)
PATH = Kind("absolute path", _path, os.path.abspath)  # an option's: from the working directory
NAME = Kind("name", _name)
HOSTS = Kind(f"list of {_HOST}", _list_of(_host, _HOST))
MIRRORS = Kind(f"list of {_MIRROR}", _list_of(_mirror, _MIRROR))
HOST_PORT = Kind("HOST:PORT", _host_port)
