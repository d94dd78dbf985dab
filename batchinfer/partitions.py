"""Hive-style partitions: `key=value` folders as columns, a filter over them, and dated templates.

Spark, Hive and most lakes write `events/date=2026-11-01/country=DE/part-00000`. Each `key=value`
folder under the input is a column of every row below it: a string unless `--partition-types` gives
another type. `--partitions "date>=2026-11-01,country=DE|FR"` selects folders; a folder the filter
refuses is not listed further. `{today}`, `{yesterday}` and `{today-N}` (UTC dates, `:FORMAT` for
another strftime format) make a scheduled run score the day it is for.
"""

from __future__ import annotations

import datetime as dt
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from batchinfer.errors import ConfigError, InputError

# What Hive and Spark write for a null partition value.
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"

# The types a partition column may be given (`--partition-types date=date32,year=int64`).
TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "date32": pa.date32(),
}
_ALIASES = {"str": "string", "int": "int64", "float": "float64", "double": "float64", "date": "date32"}

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    "==": operator.eq,
    "=": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_TERM = re.compile(r"^\s*([^=<>!,|\s][^=<>!,|]*?)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")
_DATE = re.compile(r"\{(today|yesterday)([+-]\d+)?(?::([^{}]*))?\}")
FILTER_HELP = "expected NAME=VALUE, NAME!=VALUE, NAME>=VALUE, NAME<=VALUE, NAME>VALUE or NAME<VALUE, joined by commas"


def type_name(name: str) -> str:
    """A partition type's canonical name; unknown names fail with the choices."""
    canonical = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if canonical not in TYPES:
        raise ValueError(f"unknown type {name!r} (choose from {', '.join(TYPES)})")
    return canonical


def arrow_type(types: dict[str, str], column: str) -> pa.DataType:
    return TYPES[types.get(column, "string")]


def hive_segments(relative: str, uri: str = "") -> tuple[tuple[str, str | None], ...]:
    """The `key=value` folders of a path under the input, in order; values unquoted, Hive's null as None."""
    found: dict[str, str | None] = {}
    for segment in relative.split("/")[:-1]:
        if "=" not in segment:
            continue
        key, value = segment.split("=", 1)
        key = unquote(key)
        if not key:
            continue
        if key in found:
            raise InputError(f"{uri or relative}: partition column {key!r} appears twice in its path", uri=uri or None)
        found[key] = None if value == HIVE_NULL else unquote(value)
    return tuple(found.items())


def typed_value(column: str, value: str | None, types: dict[str, str], uri: str = "") -> Any:
    """A partition value as its column's type (a Python value; None for Hive's null)."""
    if value is None:
        return None
    kind = arrow_type(types, column)
    if kind == pa.string():
        return value
    try:
        return pa.array([value], pa.string()).cast(kind)[0].as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        where = f"{uri}: " if uri else ""
        raise InputError(
            f"{where}partition value {value!r} of {column!r} is not a valid {types.get(column, 'string')}",
            uri=uri or None,
        ) from None


def constant_column(column: str, value: str | None, types: dict[str, str], rows: int) -> pa.Array:
    """A partition column for `rows` rows: one value, repeated."""
    kind = arrow_type(types, column)
    return pa.repeat(pa.scalar(typed_value(column, value, types), kind), rows)


@dataclass(frozen=True)
class Term:
    column: str
    op: str
    values: tuple[str, ...]


def parse_filter(text: str | None) -> tuple[Term, ...]:
    """`date>=2026-11-01,country=DE|FR` as terms, all of which must hold; syntax errors name the term."""
    if not text or not text.strip():
        return ()
    terms = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        match = _TERM.match(raw)
        if not match or not match.group(3) or match.group(3)[0] in "=<>!":
            raise ValueError(f"cannot read {raw.strip()!r}: {FILTER_HELP}")
        column, op, value = match.groups()
        values = tuple(v.strip() for v in value.split("|")) if op in ("=", "==", "!=") else (value,)
        if not all(values):
            raise ValueError(f"cannot read {raw.strip()!r}: an empty value between '|'")
        terms.append(Term(column, "=" if op == "==" else op, values))
    return tuple(terms)


class PartitionFilter:
    """Which partitions a run selects, from their `key=value` folders."""

    def __init__(self, text: str | None, types: dict[str, str] | None = None):
        self.text = text or ""
        self.types = dict(types or {})
        try:
            terms = parse_filter(text)
        except ValueError as exc:
            raise ConfigError(f"--partitions: {exc}") from None
        self.terms: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
        self.folder_keys: set[str] = set()  # the `key`s of the folders met while listing, pruned ones too
        self.pruned = False  # whether listing skipped a folder (what lies below it was not seen)
        for term in terms:
            try:
                values = tuple(typed_value(term.column, v, self.types) for v in term.values)
            except InputError as exc:
                raise ConfigError(f"--partitions: {exc}") from None
            self.terms.setdefault(term.column, []).append((term.op, values))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def _holds(self, column: str, raw: str | None) -> bool:
        value = typed_value(column, raw, self.types)
        for op, values in self.terms.get(column, ()):
            if value is None:
                return False
            if op == "=":
                ok = value in values
            elif op == "!=":
                ok = value not in values
            else:
                ok = _OPS[op](value, values[0])
            if not ok:
                return False
        return True

    def folder_may_hold(self, segment: str) -> bool:
        """False when a folder named `segment` (`key=value`) cannot hold a selected partition."""
        if "=" not in segment:
            return True
        key, value = segment.split("=", 1)
        key = unquote(key)
        self.folder_keys.add(key)
        if key not in self.terms:
            return True
        try:
            holds = self._holds(key, None if value == HIVE_NULL else unquote(value))
        except InputError:
            return True  # a bad value is reported with its file when the partition is read
        self.pruned = self.pruned or not holds
        return holds

    def selects(self, hive: tuple[tuple[str, str | None], ...], uri: str = "") -> bool:
        values = dict(hive)
        for column in self.terms:
            if column not in values:
                return False
            try:
                if not self._holds(column, values[column]):
                    return False
            except InputError as exc:
                raise InputError(f"{uri}: {exc}", uri=uri) from None
        return True


def expand_dates(text: str, when: dt.datetime | dt.date | None = None) -> str:
    """Replace `{today}`, `{yesterday}`, `{today-N}`, `{today+N}` (optionally `:FORMAT`) by UTC dates."""
    if "{" not in text:
        return text
    if when is None:
        when = dt.datetime.now(dt.UTC)
    if isinstance(when, dt.datetime):
        day = (when.astimezone(dt.UTC) if when.tzinfo else when).date()
    else:
        day = when

    def replace(match: re.Match[str]) -> str:
        word, shift, fmt = match.groups()
        offset = int(shift or 0) - (1 if word == "yesterday" else 0)
        return (day + dt.timedelta(days=offset)).strftime(fmt or "%Y-%m-%d")

    return _DATE.sub(replace, text)


def has_dates(text: str | None) -> bool:
    return bool(text and _DATE.search(text))
