#!/usr/bin/env bash
# The packages a GPU host without a package registry lacks, fetched here so that they travel with the
# repository, for scripts/gpu-check.sh to install there with `pip install --no-index --target`.
#
# The host: Python 3.12 on x86-64 Linux with its own torch (never shipped) and pyarrow, numpy,
# transformers, tokenizers, safetensors, fsspec and pytest. What it lacks: prefect and polars (and s3fs,
# see WITH_S3) with every package they need, as cp312 manylinux wheels at the versions of constraints.txt,
# and the tokenizer of the `minilm` model (its 90 MB of weights cannot travel: gpu-check.sh gives the
# same encoder random weights there, benchmarks/minilm_shape.py).
#
# Writes DIR (default gpu-wheels/, ignored by git):
#   wheels.tar.xz   the wheels, each stored uncompressed inside and the whole compressed with xz: wheels are
#                   zip files compressed file by file, and polars' runtime alone is a 54 MB wheel; solid xz
#                   packs the set into the limit, and unpacks to the same wheels (sha256 in wheels.txt)
#   wheels.txt      one line per wheel: sha256, size, file name
#   minilm-shape/   the minilm model's tokenizer and configuration files (about 700 kB)
# then checks that the repository's files plus DIR stay under LIMIT_MIB (default 64) and exits 1 if not.
#
# numpy and pyarrow are left out: the host's builds go with its torch and pyarrow. Every other package
# is shipped even where the host may have it, so that no version on the host can fall short of a pin.
# WITH_S3=1 adds s3fs and its stack (aiobotocore, botocore, aiohttp, ...): botocore alone is a 16 MB
# wheel that barely compresses, and with it the set does not fit in 64 MiB. Nothing the GPU check runs
# touches S3, which the CPU test suite covers against a local S3 server.
#
# Usage: [WITH_S3=1] [LIMIT_MIB=64] scripts/gpu-wheels.sh [DIR]
#        (PY_VERSION=3.11 XZ_LEVEL=6: a set for another Python, to rehearse the install where one has a registry)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
dir="${1:-$root/gpu-wheels}"
limit_mib="${LIMIT_MIB:-64}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
pin() { # the version constraints.txt pins for a package
  local version
  version=$(grep -i "^$1==" constraints.txt | head -1 | cut -d= -f3)
  if [ -z "$version" ]; then
    echo "gpu-wheels: $1 is not pinned in constraints.txt" >&2
    exit 2
  fi
  echo "$1==$version"
}
wanted=("$(pin prefect)" "$(pin polars)")
if [ "${WITH_S3:-0}" = 1 ]; then wanted+=("$(pin s3fs)"); fi

tmp="$(mktemp -d -t gpu-wheels-XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
echo "== pip download ${wanted[*]} (Python ${PY_VERSION:-3.12}, manylinux x86-64, wheels only)"
version="${PY_VERSION:-3.12}" # another version only to rehearse the install on a machine with a registry
abi="cp${version/./}"
$py -m pip download --quiet --only-binary=:all: --python-version "$version" --implementation cp \
  --abi "$abi" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -c constraints.txt -d "$tmp/downloaded" "${wanted[@]}" >"$tmp/pip.log" 2>&1 || pip_rc=$?
grep -v "is ignored: it is neither a file nor a directory" "$tmp/pip.log" || true # (local index folders)
if [ "${pip_rc:-0}" != 0 ]; then
  echo "gpu-wheels: pip download failed (exit $pip_rc)" >&2
  exit 1
fi

rm -rf "$dir"
mkdir -p "$dir"
echo "== repacking $(find "$tmp/downloaded" -name '*.whl' | wc -l) wheels (numpy and pyarrow stay out)"
DOWNLOADED="$tmp/downloaded" STORED="$tmp/stored" LIST="$dir/wheels.txt" $py - <<'EOF'
"""Each wheel again with its files stored, not deflated: xz then compresses across files and wheels."""

import hashlib
import os
import re
import zipfile
from pathlib import Path

SKIP = {"numpy", "pyarrow", "torch"}  # the host's own builds
source, target = Path(os.environ["DOWNLOADED"]), Path(os.environ["STORED"])
target.mkdir()
lines = []
for wheel in sorted(source.glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    if name in SKIP or name.startswith(("nvidia-", "triton")):
        print(f"   left out: {wheel.name}")
        continue
    out = target / wheel.name
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)  # checks each file's CRC
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr = info.external_attr
            zout.writestr(copy, data, compress_type=zipfile.ZIP_STORED)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    lines.append(f"{digest}  {out.stat().st_size}  {out.name}")
Path(os.environ["LIST"]).write_text("\n".join(lines) + "\n")
print(f"   {len(lines)} wheels, {sum(int(l.split()[1]) for l in lines) / 2**20:.1f} MiB stored")
EOF
level="${XZ_LEVEL:-9}" # 9 is what fits; a lower level only to rehearse faster
echo "== compressing (xz -$level; minutes)"
if command -v xz >/dev/null 2>&1; then
  tar -C "$tmp/stored" -cf - . | xz "-$level" -T0 >"$dir/wheels.tar.xz"
else
  (cd "$tmp/stored" && $py -c "import sys, tarfile; t = tarfile.open(sys.argv[1], 'w:xz', preset=int(sys.argv[2])); t.add('.'); t.close()" "$dir/wheels.tar.xz" "$level")
fi
$py -m benchmarks.minilm_shape copy-tokenizer "$dir/minilm-shape"

# The limit covers what travels: the repository's files (tracked, and untracked but not ignored) and DIR.
repo_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
dir_bytes=$(du -sb "$dir" | cut -f1)
total=$((repo_bytes + dir_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "== size: repository $(mib "$repo_bytes") MiB + $(basename "$dir") $(mib "$dir_bytes") MiB = $(mib "$total") MiB (limit $limit_mib MiB)"
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
  echo "gpu-wheels: FAILED: $(mib "$total") MiB would travel, over the $limit_mib MiB limit" >&2
  exit 1
fi
echo "gpu-wheels: ok: $dir is ready to travel with the repository (scripts/gpu-check.sh installs it)"
