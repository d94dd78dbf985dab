"""All storage access: local paths, file:// and s3:// URIs through fsspec/s3fs.

Nothing else in the core touches paths or filesystems. Writes are atomic from a
reader's point of view: local files are written under a temporary name in the
same folder and renamed; object stores receive one PUT of a finished file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import xxhash
from fsspec.core import url_to_fs

from batchinfer import faults
from batchinfer.config import resolve_references, scrub
from batchinfer.errors import InputError, StorageError, TransientStorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

TMP_PREFIX = ".tmp-"
_TRANSIENT_WORDS = (
    "throttl",
    "slowdown",
    "slow down",
    "timeout",
    "timed out",
    "connection reset",
    "connection refused",
    "connection aborted",
    "could not connect",
    "connect timeout",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "broken pipe",
    "temporarily",
    "endpointconnectionerror",
    "server disconnected",
)


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may cure (throttling, timeouts, dropped connections)."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


# Errors that say the disk (or quota) is full or cannot take writes: never transient, always worth the path.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large",
}


def disk_error(exc: BaseException) -> str | None:
    """What a write error says about the disk ("no space left on device"), or None when it is about something else."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return _DISK_ERRNOS[exc.errno]
    text = str(exc).lower()
    for code, reason in _DISK_ERRNOS.items():
        if f"errno {code}]" in text or reason in text:
            return reason
    return None


def storage_error(exc: BaseException, uri: str, action: str) -> StorageError | InputError:
    """Turn a filesystem exception into one of ours with a line naming the URI."""
    disk = disk_error(exc) if action == "writing" else None
    if disk:
        return StorageError(f"writing {uri} failed: {disk}", uri=uri)
    if is_transient(exc):
        return TransientStorageError(f"{action} {uri} failed (transient): {_short(exc)}", uri=uri)
    if isinstance(exc, FileNotFoundError):
        text = str(exc).lower()
        if "bucket" in text:
            return StorageError(f"{action} {uri} failed: the bucket {_bucket(uri)!r} does not exist", uri=uri)
        return InputError(f"{uri} does not exist", uri=uri)
    if isinstance(exc, PermissionError):
        return StorageError(f"{action} {uri} failed: {_denied_reason(exc)}", uri=uri)
    return StorageError(f"{action} {uri} failed: {_short(exc)}", uri=uri)


# S3 error codes that say the credentials themselves are wrong, not merely short of a permission.
_CREDENTIAL_CODES = (
    ("invalidaccesskeyid", "the access key id is not known to the server (check the credentials)"),
    ("does not exist in our records", "the access key id is not known to the server (check the credentials)"),
    ("signaturedoesnotmatch", "the secret key does not match the access key id (check the credentials)"),
    ("expiredtoken", "the session token has expired (refresh the credentials)"),
    ("invalidtoken", "the session token is not valid (check the credentials)"),
)


def _denied_reason(exc: BaseException) -> str:
    """Why storage said no, from the error code alone (messages may quote request details)."""
    text = f"{exc} {exc.__cause__!r}".lower()
    for code, reason in _CREDENTIAL_CODES:
        if code in text:
            return reason
    if "accessdenied" in text or "access denied" in text:
        return "access denied (the credentials lack permission for it)"
    return "access denied (check the credentials and permissions)"


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return scrub(text)[:300]


# Temporary files in the system's temp folder carry their process and host, so a later run can tell the
# ones a killed process left (its pid gone on this host) from those of a live one.
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_SYSTEM_TEMP = re.compile(r"^batchinfer-(\d+)-([0-9a-f]{8})-")


def temp_prefix(kind: str = "") -> str:
    """The name prefix for this process's files in the system's temp folder."""
    return f"batchinfer-{os.getpid()}-{_HOST_TAG}-{kind}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temps(folder: str | None = None) -> int:
    """Delete what killed processes of this host left in the system's temp folder; return how many."""
    folder = folder or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        match = _SYSTEM_TEMP.match(name)
        if not match or match.group(2) != _HOST_TAG or _alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
        except OSError:  # another user's, or gone already
            continue
    return removed


def _strip_protocol(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


@dataclass(frozen=True)
class FileInfo:
    """A listed file: full URI, size in bytes, a version tag (etag or mtime), its path under the listed
    folder, and the store's checksum of its bytes where the store keeps one (S3's ETag; "" on a local disk)."""

    uri: str
    size: int
    version: str
    relative: str = ""
    checksum: str = ""
    stamp: str = ""  # what changes whenever the file may have: the checksum, or inode and times on a local disk
    mtime_ns: int = 0
    inode: int = 0  # on a local disk


# Files that Spark, Hive and Hadoop leave beside the data: `_SUCCESS`, `_committed_*`, `_started_*`,
# `_temporary/`, hidden files (`.part-00000.crc`) and checksum files.
_SIDE_SUFFIXES = (".crc",)
# Listing a tree one folder at a time (to skip folders a filter refuses) reads this many folders at once.
LIST_THREADS = 16
IO_THREADS = 16
_HASH_BLOCK = 8 << 20


def is_side_file(relative: str) -> bool:
    """True for what sits beside data and is never input: hidden or `_` names at any depth, `.crc` files."""
    parts = relative.split("/")
    return any(part.startswith((".", "_")) for part in parts) or parts[-1].endswith(_SIDE_SUFFIXES)


def _checksum_of(info: dict[str, Any]) -> str:
    for key in ("ChecksumSHA256", "ChecksumCRC64NVME", "ChecksumCRC32C", "ChecksumCRC32", "ChecksumSHA1"):
        if info.get(key):
            return f"{key.removeprefix('Checksum').lower()}:{info[key]}"
    etag = info.get("ETag") or info.get("etag")
    return f"etag:{str(etag).strip(chr(34))}" if etag else ""


class Storage:
    """One filesystem plus the storage options used to reach it."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        # References ({"$env": NAME}, {"$secret": NAME}) are read here, where the storage is opened, so the
        # values never travel in parameters.
        self.options = resolve_references(dict(storage_options or {}))
        self.fs, _ = url_to_fs(_strip_protocol(uri), **self.options)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = self.protocol in ("file", "local")

    # -- naming -------------------------------------------------------------
    def path(self, uri: str) -> str:
        """The filesystem's own path for a URI (no protocol)."""
        if self.is_local and uri.startswith("/") and "//" not in uri and "/." not in uri:
            return uri.rstrip("/") or "/"  # already what fsspec would make of it, at a fraction of the cost
        return self.fs._strip_protocol(_strip_protocol(uri))

    def uri(self, path: str) -> str:
        """A URI users can read back (s3://bucket/key or a local path)."""
        return path if self.is_local else f"{self.protocol}://{path}"

    @staticmethod
    def join(base: str, *parts: str) -> str:
        base = base.rstrip("/")
        return posixpath.join(base, *parts) if parts else base

    # -- reading ------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        try:
            return self.fs.exists(self.path(uri))
        except Exception as exc:  # noqa: BLE001 - translated below
            raise storage_error(exc, uri, "checking") from exc

    def require_bucket(self, uri: str, what: str) -> None:
        """On object stores, fail with a clear line when the URI's bucket does not exist.

        Only "not found" counts: a 403 on the bucket itself is left to the real
        reads and writes, since credentials limited to a prefix may not see it.
        """
        if self.is_local:
            return
        bucket = _bucket(uri)
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise StorageError(f"{what} {uri}: the bucket {bucket!r} does not exist", uri=uri) from None
        except Exception as exc:  # noqa: BLE001 - anything else is reported by the operation itself
            log.debug("could not check the bucket of %s: %s", uri, type(exc).__name__)

    def invalidate(self, uri: str | None = None) -> None:
        """Drop cached listings (s3fs caches them; other writers may have changed the store)."""
        self.fs.invalidate_cache(self.path(uri) if uri else None)

    def info(self, uri: str) -> FileInfo:
        try:
            if self.is_local:
                path = self.path(uri)
                return _local_info(path, os.stat(path))
            info = self.fs.info(self.path(uri))
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "reading") from exc
        return self._file_info(info)

    def _file_info(self, info: dict[str, Any], relative: str = "") -> FileInfo:
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        if hasattr(version, "isoformat"):
            version = version.isoformat()
        if isinstance(version, float):
            version = repr(version)
        checksum = "" if self.is_local else _checksum_of(info)
        return FileInfo(
            uri=self.uri(info["name"]),
            size=int(info.get("size") or 0),
            version=str(version).strip('"'),
            relative=relative,
            checksum=checksum,
            stamp=checksum,
        )

    def list_files(
        self, uri: str, suffix: str = "", *, keep_folder: Callable[[str], bool] | None = None
    ) -> list[FileInfo]:
        """Files under a folder, a glob or a single file, sorted, without what sits beside data (`is_side_file`).

        Whether a file is Parquet is for its footer to say (planning), not its name; `suffix` keeps only the
        names that end with it. `keep_folder(name)` False skips a folder of a folder input without listing
        what it holds.
        """
        files = self._list_files(uri, keep_folder)
        return [f for f in files if f.uri.endswith(suffix)] if suffix else files

    def _list_files(self, uri: str, keep_folder: Callable[[str], bool] | None) -> list[FileInfo]:
        path = self.path(uri)
        try:
            self.fs.invalidate_cache()
            if any(ch in path for ch in "*?["):
                found = self.fs.glob(path, detail=True)
                root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0]
            elif self.is_local and os.path.isdir(path):
                root = path.rstrip("/")
                return _local_files(root, _local_tree(root, keep_folder, skip_side=True))
            elif self.fs.isfile(path):
                found, root = {path: self.fs.info(path)}, posixpath.dirname(path.rstrip("/"))
            elif self.fs.isdir(path):
                root = path.rstrip("/")
                found = self._walk(root, keep_folder) if keep_folder else self.fs.find(root, detail=True)
            else:
                self.require_bucket(uri, "input")
                raise InputError(f"input {uri} does not exist", uri=uri)
        except (InputError, StorageError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "listing") from exc
        files = []
        root = root.rstrip("/")
        for name, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            relative = name[len(root) :].lstrip("/") if name.startswith(root + "/") else posixpath.basename(name)
            if is_side_file(relative):
                continue
            files.append(
                _local_info(name, os.stat(name), relative) if self.is_local else self._file_info(info, relative)
            )
        return files

    def _walk(self, root: str, keep_folder: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
        """`find` one folder level at a time, never entering a folder `keep_folder` refuses."""
        found: dict[str, dict[str, Any]] = {}
        level = [root]
        with ThreadPoolExecutor(max_workers=1 if self.is_local else LIST_THREADS) as pool:
            while level:
                below = []
                for folder, entries in zip(level, pool.map(lambda f: self.fs.ls(f, detail=True), level), strict=True):
                    for info in entries:
                        name = info["name"].rstrip("/")
                        if name == folder:  # an object store's folder placeholder
                            continue
                        base = posixpath.basename(name)
                        if info.get("type") == "directory":
                            if not base.startswith((".", "_")) and keep_folder(base):
                                below.append(name)
                        else:
                            found[name] = info
                level = below
        return found

    def list_tree(self, uri: str, *, sizes: bool = True) -> dict[str, FileInfo]:
        """Every file under a folder by its path relative to it ({} when the folder does not exist).

        `sizes=False`: on a local disk, names and inodes only (no `stat` per file; sizes and times are 0).
        """
        path = self.path(uri).rstrip("/")
        try:
            if self.is_local:
                if not sizes:
                    return {
                        name[len(path) + 1 :]: FileInfo(name, 0, "", name[len(path) + 1 :], inode=inode)
                        for name, inode in _local_inodes(path).items()
                    }
                tree = _local_tree(path)
                return {
                    name[len(path) + 1 :]: _local_info(name, stat, name[len(path) + 1 :]) for name, stat in tree.items()
                }
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return {}
            found = self.fs.find(path, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "listing") from exc
        out = {}
        for name, info in found.items():
            if info.get("type") != "directory" and name.startswith(path + "/"):
                relative = name[len(path) + 1 :]
                out[relative] = self._file_info(info, relative)
        return out

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file, in one request on object stores."""
        try:
            if self.is_local:
                with open(self.path(uri), "rb") as handle:
                    handle.seek(start)
                    return handle.read(end - start)
            return self.fs.cat_file(self.path(uri), start=start, end=end)
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "reading") from exc

    def file_record(self, uri: str) -> dict[str, Any]:
        """What proves later that a file we wrote is unchanged: its size and a checksum of its bytes.

        On object stores the store's own checksum (the ETag, set by the store from the bytes it
        received). On a local disk an xxh3-128 of the bytes, plus the modification time, so that a check
        can skip hashing a file that no write has touched since (BENCHMARKS.md, "Fingerprints").
        """
        if not self.is_local:
            self.invalidate(uri)
            info = self.info(uri)
            return {"size": info.size, "checksum": info.checksum}
        path = self.path(uri)
        try:
            stat = os.stat(path)
            digest = hash_file(path)
        except OSError as exc:
            raise storage_error(exc, uri, "reading") from exc
        return {"size": stat.st_size, "checksum": digest, "mtime_ns": stat.st_mtime_ns}

    def unchanged(self, uri: str, record: dict[str, Any], listed: FileInfo | None) -> str:
        """ "" when the file still matches `record` (from `file_record`), else what differs."""
        if listed is None:
            return "the file is missing"
        if listed.size != record.get("size"):
            return f"size {listed.size} bytes, {record.get('size')} when committed"
        if not self.is_local:
            return "" if listed.checksum == record.get("checksum") else "its checksum differs from the committed one"
        if listed.mtime_ns == record.get("mtime_ns"):
            return ""  # no write since it was committed (a write sets the time)
        try:
            digest = hash_file(self.path(uri))
        except FileNotFoundError:
            return "the file is missing"
        except OSError as exc:
            raise storage_error(exc, uri, "reading") from exc
        return "" if digest == record.get("checksum") else "its checksum differs from the committed one"

    def map(self, fn: Callable[[T], R], items: list[T], *, local_threads: int = 1) -> list[R]:
        """`fn` over `items` in order; many at once on object stores, where each call waits on the network,
        and `local_threads` at once on a local disk."""
        threads = local_threads if self.is_local else IO_THREADS
        if threads < 2 or len(items) < 2:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fn, items))

    @contextmanager
    def open(self, uri: str, mode: str = "rb") -> Iterator[IO[bytes]]:
        try:
            handle = self.fs.open(self.path(uri), mode)
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "opening") from exc
        with handle:
            yield handle

    def read_bytes(self, uri: str) -> bytes:
        try:
            if self.is_local:
                with open(self.path(uri), "rb") as handle:
                    return handle.read()
            return self.fs.cat_file(self.path(uri))
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "reading") from exc

    def read_json(self, uri: str) -> Any:
        data = self.read_bytes(uri)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri} is not valid JSON ({exc.msg})", uri=uri) from None

    def list_names(self, uri: str) -> list[str]:
        """Base names directly under a folder ([] when it does not exist)."""
        path = self.path(uri)
        try:
            if self.is_local:
                return sorted(os.listdir(path)) if os.path.isdir(path) else []
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return []
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "listing") from exc

    # -- writing ------------------------------------------------------------
    @contextmanager
    def atomic_local_file(self, uri: str, suffix: str = "") -> Iterator[str]:
        """Yield a local temp path; on success it becomes `uri` in one step, else it is removed.

        A full disk (or quota) while the caller writes the temp file is reported with `uri`'s path.
        """
        try:
            if self.is_local:
                target = self.path(uri)
                folder = posixpath.dirname(target)
                os.makedirs(folder, exist_ok=True)
                tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}{suffix}")
            else:
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=suffix)
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc, uri, "writing") from exc
        try:
            try:
                yield tmp
            except OSError as exc:
                disk = disk_error(exc)
                if disk and not self.is_local:  # the local disk under the temporary copy, not the store
                    where = posixpath.dirname(tmp)
                    raise StorageError(f"writing {uri} failed: {disk} for its temporary copy in {where}") from exc
                if disk:
                    raise storage_error(exc, uri, "writing") from exc
                raise
            faults.point(f"rename:{posixpath.basename(posixpath.dirname(uri.rstrip('/')))}/{posixpath.basename(uri)}")
            if self.is_local:
                try:
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
                    os.replace(tmp, target)
                except OSError as exc:
                    raise storage_error(exc, uri, "writing") from exc
                _fsync_dir(folder)
            else:
                try:
                    self.fs.put_file(tmp, self.path(uri))
                except Exception as exc:  # noqa: BLE001
                    raise storage_error(exc, uri, "writing") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def copy(self, src_uri: str, dst_uri: str) -> None:
        """Make `dst_uri` a copy of `src_uri` in one step, without moving the bytes through this process.

        On a local disk a hard link under a temporary name, then renamed (no data written, nothing new
        to sync; a plain copy, synced, where links are refused); elsewhere the store's own copy (S3's
        CopyObject), which creates the object whole or not at all.
        """
        if not self.is_local:
            try:
                self.fs.copy(self.path(src_uri), self.path(dst_uri))
            except Exception as exc:  # noqa: BLE001
                raise storage_error(exc, dst_uri, "writing") from exc
            return
        source, target = self.path(src_uri), self.path(dst_uri)
        folder = posixpath.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}{posixpath.splitext(target)[1]}")
        try:
            try:
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                raise storage_error(exc, dst_uri, "writing") from exc
            _fsync_dir(folder)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object atomically."""
        with self.atomic_local_file(uri) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(data)

    def write_json(self, uri: str, value: Any, *, indent: int | None = 2) -> None:
        self.write_bytes(uri, (json.dumps(value, indent=indent, sort_keys=True, default=str) + "\n").encode())

    def remove(self, uri: str, recursive: bool = False) -> None:
        path = self.path(uri)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "removing") from exc

    # -- conditional writes (object stores: S3's If-None-Match / If-Match) ----------------
    def create_new(self, uri: str, data: bytes) -> str | None:
        """Write `uri` only if nothing is there; the new object's version tag, or None when one exists."""
        try:
            out = self.fs.pipe_file(self.path(uri), data, mode="create")
        except FileExistsError:
            return None
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                return None
            raise storage_error(exc, uri, "writing") from exc
        return _etag(out)

    def replace_if(self, uri: str, data: bytes, version: str) -> str | None:
        """Overwrite `uri` only while its version tag is `version`; the new tag, or None when it changed."""
        out = self._if_match(uri, "put_object", "writing", version, Body=data)
        return None if out is None else _etag(out)

    def remove_if(self, uri: str, version: str) -> bool:
        """Delete `uri` only while its version tag is `version`; False when it changed or is gone."""
        return self._if_match(uri, "delete_object", "removing", version) is not None

    def _if_match(self, uri: str, method: str, action: str, version: str, **params: Any) -> Any:
        """S3's `method` on `uri` with If-Match `version`: its response, or None when the object changed or is gone."""
        bucket, key, _ = self.fs.split_path(self.path(uri))
        try:
            out = self.fs.call_s3(method, Bucket=bucket, Key=key, IfMatch=f'"{version}"', **params)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                return None
            raise storage_error(exc, uri, action) from exc
        self.fs.invalidate_cache(self.path(uri))
        return out

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """An object's bytes and its version tag as read just before them, or None when it does not exist.

        The bytes may be newer than the tag: a conditional write with that tag then fails, as it should.
        """
        path = self.path(uri)
        try:
            self.fs.invalidate_cache(path)
            version = self._file_info(self.fs.info(path)).version
            return self.fs.cat_file(path), version
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise storage_error(exc, uri, "reading") from exc

    def remove_stale_temps(self, folder_uri: str, *, recursive: bool = False) -> int:
        """Delete temporary files a killed attempt left behind; return how many."""
        if not self.is_local:
            return 0
        removed = 0
        names = list(self.list_tree(folder_uri, sizes=False)) if recursive else self.list_names(folder_uri)
        for name in names:
            if posixpath.basename(name).startswith(TMP_PREFIX):
                self.remove(self.join(folder_uri, name))
                removed += 1
        return removed

    def remove_empty_folders(self, folder_uri: str) -> None:
        """Remove empty folders under a local folder (object stores have none)."""
        if not self.is_local:
            return
        root = self.path(folder_uri)
        for folder, subfolders, files in os.walk(root, topdown=False):
            if folder != root and not subfolders and not files:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass

    def _one_device(self, a: str, b: str) -> bool:
        """Whether two local folders are on one filesystem (inode numbers compare only there); cached."""
        known = self.__dict__.setdefault("_devices", {})
        for folder in (a, b):
            if folder not in known:
                try:
                    known[folder] = os.stat(folder).st_dev
                except OSError:
                    return False
        return known[a] == known[b]

    def same_file(
        self,
        source_uri: str,
        target_uri: str,
        record: dict[str, Any],
        target: FileInfo | None,
        source: FileInfo | None = None,
    ) -> bool:
        """True when `target` already holds the bytes of `source` (whose `file_record` is `record`).

        `target` and `source` as listed; on a local disk one inode is one file, whatever its size says.
        """
        if target is None:
            return False
        if self.is_local and source is not None and target.inode and target.inode == source.inode:
            if self._one_device(posixpath.dirname(source.uri), posixpath.dirname(target.uri)):
                return True  # a hard link
        if target.size != record.get("size") and (target.size or not self.is_local):
            return False
        if not self.is_local:
            return bool(target.checksum) and target.checksum == record.get("checksum")
        try:
            if os.path.samefile(self.path(source_uri), self.path(target_uri)):
                return True  # a hard link: no bytes to compare
            return hash_file(self.path(target_uri)) == record.get("checksum")
        except OSError:
            return False


def _etag(response: Any) -> str:
    tag = response.get("ETag", "") if isinstance(response, dict) else ""
    return str(tag).strip('"')


def _precondition_failed(exc: BaseException) -> bool:
    """Whether the store refused a conditional request because its condition did not hold (HTTP 412/409)."""
    seen: BaseException | None = exc
    while seen is not None:
        error = (getattr(seen, "response", None) or {}).get("Error", {})
        if error.get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return True
        seen = seen.__cause__
    return "pre-conditions you specified did not hold" in str(exc)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def hash_file(path: str) -> str:
    """xxh3-128 of a local file's bytes, read in blocks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return f"xxh3-128:{digest.hexdigest()}"


def _walk_local(
    root: str, keep_folder: Callable[[str], bool] | None = None, *, skip_side: bool = False
) -> Iterator[os.DirEntry[str]]:
    """Every file under a local folder, one `scandir` per folder (fsspec's `find` costs 10x)."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                if entry.is_dir():
                    if skip_side and entry.name.startswith((".", "_")):
                        continue
                    if keep_folder is None or keep_folder(entry.name):
                        folders.append(entry.path)
                elif entry.is_file():
                    yield entry


def _local_tree(
    root: str, keep_folder: Callable[[str], bool] | None = None, *, skip_side: bool = False
) -> dict[str, os.stat_result]:
    """Every file under a local folder with its stat."""
    return {entry.path: entry.stat() for entry in _walk_local(root, keep_folder, skip_side=skip_side)}


def _local_inodes(root: str) -> dict[str, int]:
    """Every file under a local folder with its inode, which `scandir` gives without a `stat`."""
    return {entry.path: entry.inode() for entry in _walk_local(root)}


def _local_info(path: str, stat: os.stat_result, relative: str = "") -> FileInfo:
    return FileInfo(
        uri=path,
        size=stat.st_size,
        version=repr(stat.st_mtime),
        relative=relative,
        stamp=f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_ctime_ns}",
        mtime_ns=stat.st_mtime_ns,
        inode=stat.st_ino,
    )


def _local_files(root: str, tree: dict[str, os.stat_result]) -> list[FileInfo]:
    files = []
    for path, stat in sorted(tree.items()):
        relative = path[len(root) + 1 :]
        if not is_side_file(relative):
            files.append(_local_info(path, stat, relative))
    return files
