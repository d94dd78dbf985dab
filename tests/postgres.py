"""A throwaway PostgreSQL server on loopback, for a Prefect server that people click in (tests/test_browser.py).

Debian's `postgresql` package provides the binaries (scripts/install-ui-test.sh installs it when missing).
PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user and lives in a
fresh directory under /tmp, which that user can reach. Trust authentication on loopback only, and fsync
off: the data is thrown away with the server.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import warnings
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
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root, the test needs runuser (util-linux) to start PostgreSQL")
            self.as_owner = [runuser, "-u", "postgres", "--"]
        self.port = 0
        self.root: Path | None = None

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
        # From a folder the postgres user can enter: PostgreSQL's programs change back to where they started.
        done = subprocess.run([*self.as_owner, *argv], capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            output = (done.stdout + done.stderr)[-1500:]
            raise RuntimeError(f"{' '.join(argv[:2])} exited {done.returncode}: {output}\n{tail}".strip())
        return done.stdout

    def query(self, sql: str) -> str:
        """One statement through psql; its rows, unaligned."""
        address = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", self.database]
        return self._run([_bin("psql"), *address, "-X", "-tA", "-c", sql]).strip()

    def start(self) -> PostgresServer:
        self.root = Path(tempfile.mkdtemp(prefix="batchinfer-pg-", dir="/tmp" if self.as_owner else None))
        data, sockets = self.root / "data", self.root / "socket"
        sockets.mkdir()
        if self.as_owner:
            shutil.chown(self.root, "postgres")
            shutil.chown(sockets, "postgres")
        initdb = [_bin("initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--locale=C"]
        self._run([*initdb, "--no-sync"])
        self.port = free_port()  # taken as late as possible: another process could bind it meanwhile
        options = f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([_bin("pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"), "-w", "-o", options, "start"])
        self._run([_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database])
        return self

    def stop(self) -> None:
        """Stop the server if it runs (also after a start that failed half-way), then remove its folder."""
        if self.root is None:
            return
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._run([_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            warnings.warn(f"PostgreSQL did not stop: {exc}", stacklevel=2)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
