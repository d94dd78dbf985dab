"""What a local partition's fingerprint costs: a hash of all its bytes, or its size plus its footer's bytes.

    .venv/bin/python -m benchmarks.fingerprints --gigabytes 10

Writes one Parquet file of about `--gigabytes` GB (64 float32 columns of random values, uncompressed, row
groups of 1,000,000 rows) under `.bench/`, then times, side by side in this one run:

- the footer: a read of the file's last 64 KiB (a second read when the footer is larger), a SHA-256 of
  the footer's bytes, and pyarrow parsing it (what planning needs anyway): batchinfer's choice;
- xxh3-128, CRC-32 (zlib) and SHA-256 of every byte, read in 8 MiB blocks.

Each is timed cold (the file's pages dropped from the page cache with posix_fadvise first, so the disk is
read) and warm (the pages cached). The file is removed afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = 8 << 20
COLUMNS = 64
ROW_GROUP_ROWS = 1_000_000


def write_file(path: Path, gigabytes: float) -> int:
    rows = int(gigabytes * 1e9 / (COLUMNS * 4))
    rng = np.random.default_rng(0)
    names = [f"f{i:02d}" for i in range(COLUMNS)]
    schema = pa.schema([(name, pa.float32()) for name in names])
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        for start in range(0, rows, ROW_GROUP_ROWS):
            n = min(ROW_GROUP_ROWS, rows - start)
            values = rng.standard_normal((COLUMNS, n), dtype=np.float32)
            writer.write_table(pa.table(list(values), schema=schema))
    return rows


def drop_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def footer(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(size - (64 << 10), 0))
        tail = handle.read()
        length = int.from_bytes(tail[-8:-4], "little")
        if length + 8 > len(tail):
            handle.seek(size - length - 8)
            tail = handle.read()
    data = tail[-(length + 8) :]
    pq.ParquetFile(pa.BufferReader(b"PAR1" + data)).metadata  # noqa: B018 - parsed, as planning does
    return f"{size}|{hashlib.sha256(data).hexdigest()}"


def whole(make: Callable[[], Any]) -> Callable[[Path], str]:
    def run(path: Path) -> str:
        digest = make()
        with open(path, "rb") as handle:
            while block := handle.read(BLOCK):
                digest.update(block)
        return digest.hexdigest()

    return run


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, block: bytes) -> None:
        self.value = zlib.crc32(block, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


METHODS: dict[str, Callable[[Path], str]] = {
    "footer + size (SHA-256 of the footer)": footer,
    "xxh3-128 of the bytes": whole(xxhash.xxh3_128),
    "CRC-32 of the bytes": whole(_Crc32),
    "SHA-256 of the bytes": whole(hashlib.sha256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=10.0)
    parser.add_argument("--bench-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--keep", action="store_true", help="keep the file for another run")
    parser.add_argument("--json", default=str(RESULTS / "fingerprints.json"))
    args = parser.parse_args()
    path = Path(args.bench_dir) / "fingerprints" / f"data-{args.gigabytes:g}GB.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        print(f"writing {path} ...", end=" ", flush=True)
        started = time.perf_counter()
        write_file(path, args.gigabytes)
        print(f"{time.perf_counter() - started:.1f} s", flush=True)
    size = path.stat().st_size
    print(f"{size / 1e9:.2f} GB, {pq.ParquetFile(path).metadata.num_row_groups} row groups")
    results = []
    try:
        for name, method in METHODS.items():
            row: dict[str, Any] = {"method": name}
            for state in ("cold", "warm"):
                if state == "cold":
                    drop_cache(path)
                started = time.perf_counter()
                method(path)
                row[f"{state}_seconds"] = time.perf_counter() - started
            row["warm_gb_per_s"] = None if method is footer else size / 1e9 / row["warm_seconds"]
            results.append(row)
            print(f"  {name}: cold {row['cold_seconds']:.4f} s, warm {row['warm_seconds']:.4f} s", flush=True)
    finally:
        if not args.keep:
            path.unlink()
    lines = ["| method | cold (s) | warm (s) | warm GB/s |", "|---|---|---|---|"]
    for row in results:
        lines.append(
            f"| {row['method']} | {row['cold_seconds']:.4f} | {row['warm_seconds']:.4f} | "
            f"{'-' if row['warm_gb_per_s'] is None else format(row['warm_gb_per_s'], '.2f')} |"
        )
    print("\n" + "\n".join(lines))
    info = {
        "command": " ".join([".venv/bin/python -m benchmarks.fingerprints", *sys.argv[1:]]),
        "bytes": size,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
