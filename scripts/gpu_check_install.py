"""Part of scripts/gpu-check.sh: install the wheels that travelled with the repository, offline, and check
that every requirement of what they bring is met by them and the Python running the check.

Environment: WHEELS (the folder scripts/gpu-wheels.sh wrote), SITE (the folder to install into, for
PYTHONPATH). Exits 1 with one line starting `gpu-check: ` when a wheel is damaged, pip fails, or a
requirement is not met.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

TOP = ("prefect", "polars", "s3fs")


def fail(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)
    raise SystemExit(1)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unpack(wheels: Path, into: Path) -> list[Path]:
    """The archive's wheels, each checked against wheels.txt (sha256 and size)."""
    listed = {}
    for line in (wheels / "wheels.txt").read_text().splitlines():
        if line.strip():
            digest, size, name = line.split()
            listed[name] = (digest, int(size))
    into.mkdir(parents=True, exist_ok=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(wheels / "wheels.tar.xz", "r:xz") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(".whl"):
                member.name = os.path.basename(member.name)
                archive.extract(member, into, **safe)
    found = sorted(into.glob("*.whl"))
    if {p.name for p in found} != set(listed):
        fail(f"{wheels / 'wheels.tar.xz'} does not hold the wheels wheels.txt lists; run scripts/gpu-wheels.sh again")
    for path in found:
        digest, size = listed[path.name]
        if path.stat().st_size != size or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            fail(f"{path.name} is damaged (sha256 differs from wheels.txt); run scripts/gpu-wheels.sh again")
    return found


def _packaging():
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]
    return Requirement, Version, default_environment


def check_requirements(site: Path) -> tuple[list[str], int]:
    """Walk the requirements of the top packages through what SITE and this Python hold (SITE first, as on
    PYTHONPATH). Returns the top packages found and how many distributions were checked."""
    requirement_type, version_type, environment = _packaging()
    dists: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=[str(site), *sys.path]):
        name = norm(dist.metadata["Name"] or "")
        dists.setdefault(name, dist)  # the first on the path is the one imported
    top = [name for name in TOP if name in dists]
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in top]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = dists[name]
        for text in dist.requires or []:
            requirement = requirement_type(text)
            env = environment()
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({**env, "extra": extra}) for extra in (extras or {""})
            ):
                continue
            needed = norm(requirement.name)
            have = dists.get(needed)
            who = f"{dist.metadata['Name']} {dist.version}"
            if have is None:
                fail(f"{who} needs {requirement}, which is neither in the wheels nor in this Python")
            if requirement.specifier and not requirement.specifier.contains(
                version_type(have.version), prereleases=True
            ):
                fail(f"{who} needs {requirement}, but this Python has {have.metadata['Name']} {have.version}")
            todo.append((needed, frozenset(requirement.extras)))
    return top, len({name for name, _ in seen})


def main() -> None:
    wheels, site = Path(os.environ["WHEELS"]), Path(os.environ["SITE"])
    started = time.perf_counter()
    found = unpack(wheels, site.with_name(site.name + "-wheels"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    command += ["--target", str(site), *map(str, found)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        fail(f"pip install --no-index --target {site} failed: {lines[-1] if lines else done.returncode}")
    top, checked = check_requirements(site)
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(
        f"installed {len(found)} wheels into {site} ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s; "
        f"every requirement of {', '.join(top) or 'nothing'} is met ({checked} distributions checked)",
        flush=True,
    )


if __name__ == "__main__":
    main()
