"""Where each output lives under OUTPUT/ (DESIGN.md, "On storage")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchinfer.errors import ConfigError
from batchinfer.storage import Storage

_SHARD_ID = re.compile(r"^[0-9a-f]{16}$")


def check_shard_id(shard_id: str) -> str:
    """Shard ids are 16 hex digits: they can never name a path outside the output prefix."""
    # fullmatch: `$` alone would let a trailing newline through.
    if not isinstance(shard_id, str) or not _SHARD_ID.fullmatch(shard_id):
        raise ConfigError(f"invalid shard id {shard_id!r}: expected 16 hexadecimal digits")
    return shard_id


def check_part_name(name: str) -> str:
    """A part's name is a relative path that stays inside predictions/."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"invalid part name {name!r}: expected a relative path inside predictions/")
    return name


@dataclass(frozen=True)
class Layout:
    root: str

    def shard(self, shard_id: str) -> str:
        return Storage.join(self.root, "shards", f"{check_shard_id(shard_id)}.parquet")

    def marker(self, shard_id: str) -> str:
        return Storage.join(self.root, "markers", f"{check_shard_id(shard_id)}.json")

    def errors(self, shard_id: str) -> str:
        return Storage.join(self.root, "errors", f"{check_shard_id(shard_id)}.parquet")

    def part(self, name: str) -> str:
        """A partition's merged part: `name` is its path under the input (`Partition.part`)."""
        return Storage.join(self.root, "predictions", check_part_name(name))

    @property
    def shards_dir(self) -> str:
        return Storage.join(self.root, "shards")

    @property
    def markers_dir(self) -> str:
        return Storage.join(self.root, "markers")

    @property
    def errors_dir(self) -> str:
        return Storage.join(self.root, "errors")

    @property
    def predictions_dir(self) -> str:
        return Storage.join(self.root, "predictions")

    @property
    def manifest(self) -> str:
        return Storage.join(self.root, "manifest.json")

    @property
    def success(self) -> str:
        return Storage.join(self.root, "_SUCCESS")
