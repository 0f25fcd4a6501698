"""containerd's list filters for snapshots: `FIELD`, `FIELD==VALUE`, `FIELD!=VALUE` and
`FIELD~=REGEX`, joined by `,` (all must hold); several filters match when any does.
Fields: name, parent, kind, `labels.KEY` or `labels."KEY"`; values bare or double-quoted.

containerd's metadata store finds a remote snapshot by listing with
`labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT`; it re-checks what it gets, so
a filter we cannot parse matches everything rather than failing the call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lazyfs.snapshotter.store import Kind

_TERM = re.compile(
    r'\s*(?P<field>labels\.(?:"(?:[^"\\]|\\.)*"|[^,=!~\s]+)|[A-Za-z_]+)\s*'
    r'(?:(?P<op>==|!=|~=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)'
)


@dataclass(frozen=True)
class Term:
    field: str
    op: str  # "", "==", "!=", "~="
    value: str


Filter = tuple[Term, ...]


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        unquoted: str = json.loads(text)
        return unquoted
    return text


def parse_filters(texts: list[str]) -> list[Filter] | None:
    """The filters, or None (match everything) when empty or not understood."""
    parsed: list[Filter] = []
    for text in texts:
        terms, position = [], 0
        while position < len(text):
            match = _TERM.match(text, position)
            if match is None or match.end() == position:
                return None
            field = match["field"]
            if field.startswith("labels."):
                field = "labels." + _unquote(field.removeprefix("labels."))
            terms.append(Term(field, match["op"] or "", _unquote(match["value"] or "")))
            position = match.end()
        parsed.append(tuple(terms))
    return parsed or None


def matches(
    filters: list[Filter] | None, name: str, parent: str, labels: Mapping[str, str], kind: Kind
) -> bool:
    if filters is None:
        return True
    fields = {"name": name, "parent": parent, "kind": kind.name.lower()}
    return any(all(_holds(term, fields, labels) for term in one) for one in filters)


def _holds(term: Term, fields: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    if term.field.startswith("labels."):
        actual = labels.get(term.field.removeprefix("labels."))
    else:
        actual = fields.get(term.field)
    if term.op == "":
        return bool(actual)
    if term.op == "==":
        return actual == term.value
    if term.op == "!=":
        return actual != term.value
    try:
        return actual is not None and re.search(term.value, actual) is not None
    except re.error:
        return False
