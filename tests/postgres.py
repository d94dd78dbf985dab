"""A throwaway PostgreSQL server on loopback, for a Prefect server that people click in (tests/test_browser.py).

Debian's `postgresql` package provides the binaries (scripts/install-ui-test.sh installs it when missing).
PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user and its folder
lives in a fresh directory under the system temp dir, which that user can reach. Trust authentication on
loopback only, and fsync off: the data is thrown away with the server.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port

INSTALL_HINT = "install Debian's PostgreSQL with scripts/install-ui-test.sh"


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed (looked on PATH and /usr/lib/postgresql); {INSTALL_HINT}"
        )
    return found


class PostgresServer:
    def __init__(self, user: str = "prefect", database: str = "prefect"):
        self.user, self.database = user, database
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="batchinfer-pg-"))
        self.data, self.socket_dir = self.root / "data", self.root / "socket"
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            self.as_owner = [_bin("runuser"), "-u", "postgres", "--"]
        self.started = False

    @property
    def prefect_settings(self) -> dict[str, str]:
        """What a Prefect server needs to keep its database here (deployments/README.md shows the same)."""
        return {
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
            "PREFECT_SERVER_DATABASE_HOST": "127.0.0.1",
            "PREFECT_SERVER_DATABASE_PORT": str(self.port),
            "PREFECT_SERVER_DATABASE_USER": self.user,
            "PREFECT_SERVER_DATABASE_NAME": self.database,
        }

    def _run(self, argv: list[str]) -> str:
        done = subprocess.run([*self.as_owner, *argv], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
        return done.stdout

    def query(self, sql: str) -> str:
        """One statement through psql; its rows, unaligned."""
        address = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", self.database]
        return self._run([_bin("psql"), *address, "-X", "-tA", "-c", sql]).strip()

    def start(self) -> PostgresServer:
        self.socket_dir.mkdir(parents=True)
        if self.as_owner:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._run([_bin("initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"])
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            [_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o", options, "start"]
        )
        self.started = True
        self._run([_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database])
        return self

    def stop(self) -> None:
        try:
            if self.started:
                self._run([_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
