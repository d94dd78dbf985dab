"""Named points in a run where a drill can hold it, to SIGKILL it exactly there (tests/test_kills.py).

Off unless `BATCHINFER_FAULT_POINTS` names a folder. A line `PATTERN SECONDS` in its file `pause`
makes each point whose name matches the glob PATTERN append its name to the file `reached`, then wait
SECONDS before going on. Points: `startup`, `scoring` (a shard's first chunk), `commit.data` (a shard's
data is in place, its marker not yet), `commit.marker` (both in place, the task not yet ended),
`merge.validated` (every shard checked, no part committed yet), `rename:FOLDER/NAME` (a file written
under a temporary name, just before the rename or the upload).
"""

from __future__ import annotations

import fnmatch
import os
import time

FAULTS_ENV = "BATCHINFER_FAULT_POINTS"


def point(name: str) -> None:
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    try:
        with open(os.path.join(folder, "pause")) as handle:
            rules = [line.split() for line in handle if line.strip()]
    except OSError:
        return
    for pattern, seconds in rules:
        if fnmatch.fnmatchcase(name, pattern):
            with open(os.path.join(folder, "reached"), "a") as handle:
                handle.write(f"{name} {os.getpid()}\n")
            time.sleep(float(seconds))
            return
