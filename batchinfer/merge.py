"""Merge-and-validate: gather committed shards into predictions/, check them, then mark success.

A shard passed its checks when it was committed (schema, row counts, keys, and the checks of the output kind
in batchinfer/outputs.py: finite values everywhere, classifier rows summing to 1 with the argmax predicted,
multilabel probabilities in [0, 1], unit-norm embeddings where the model declares them), and its marker
records them with the size and checksum of its files. Here every planned shard needs such a marker, row
counts that add up, one schema across shards, and files that are still the ones committed: one listing and
the markers, not the rows, so a run over a large output that is mostly done costs what is new. A file that
changed since its commit is checked in full, to name what is wrong with it, and loses its marker, so it is
scored again. Across shards: no key twice (checked on the input when planning). The merged parts are
committed only if every check passed; `manifest.json` follows, `_SUCCESS` last.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer import faults, outputlock, outputs
from batchinfer.errors import BatchInferError
from batchinfer.layout import Layout
from batchinfer.pipeline import Plan, _read_column, manifest, write_manifest
from batchinfer.planning import Shard, current_fingerprint
from batchinfer.runner import is_done, read_marker
from batchinfer.storage import FileInfo, Storage
from batchinfer.writer import open_writer

log = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class RunReport:
    """The outcome of a run: totals, each check, and every failure named by shard and check."""

    ok: bool
    output_uri: str
    rows: int = 0
    rows_out: int = 0
    rows_error: int = 0
    shards: int = 0
    shards_run: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    parts: int = 0
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)
    missing_keys: int = 0
    damaged: list[str] = field(default_factory=list)  # shards whose file failed its check: marker removed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def first_failure(self) -> str:
        return self.failures[0] if self.failures else ""


class _Invalid(Exception):
    """A check failed; carries the line naming the shard and the check."""


def merge_and_validate(plan: Plan, results: dict[str, dict[str, Any]] | None = None) -> RunReport:
    """Check every planned shard, write the merged parts, the manifest and `_SUCCESS`.

    A committed shard whose file changed since its commit, or is gone, loses its marker (`report.damaged`),
    so it is scored again, by this run (the flow does) or the next. Nothing is committed unless the manifest
    and every merged shard's marker still belong to this run.
    """
    started = time.perf_counter()
    results = results or {}
    config, settings = plan.config, plan.settings
    storage = Storage(settings.output_uri, config.input.storage_options)
    in_storage = Storage(config.input.uri, config.input.storage_options)
    layout = Layout(settings.output_uri)
    report = RunReport(ok=False, output_uri=settings.output_uri, shards=len(plan.shards), rows=plan.total_rows)
    report.shards_skipped = len(plan.done)
    report.shards_run = sum(1 for r in results.values() if r.get("state") == "done")

    versions = _marker_versions(storage, layout)  # before reading them: a later rewrite shows as a new version
    shard_files = storage.list_tree(layout.shards_dir)
    markers = committed_markers(plan, results, storage, layout, shard_files)
    over = _over_error_policy(plan, markers)
    markers = {k: v for k, v in markers.items() if k not in over}
    failed = [s for s in plan.shards if s.shard_id not in markers]
    for shard in failed:
        reason = (
            over.get(shard.shard_id)
            or (results.get(shard.shard_id) or {}).get("error")
            or "no marker (not run or interrupted)"
        )
        report.failed_shards[shard.shard_id] = reason
        report.failures.append(
            f"shard {shard.shard_id} ({shard.partition_uri} rows {shard.row_start}+{shard.num_rows}): {reason}"
        )
    report.shards_failed = len(failed)
    report.checks.append(
        Check("error rows within --max-error-ratio", not over, f"{len(over)} shard(s) over it" if over else "")
    )
    allowed = int(np.floor((1.0 - config.output.min_success_ratio) * len(plan.shards) + 1e-9))
    report.checks.append(
        Check(
            "shards succeeded",
            len(failed) <= allowed,
            f"{len(plan.shards) - len(failed)}/{len(plan.shards)} (min ratio {config.output.min_success_ratio})",
        )
    )
    if len(failed) > allowed:
        return _finish(plan, storage, layout, report, results, started, state="failed", versions=versions)

    try:
        _check_input_unchanged(plan, in_storage, report)
        _check_committed_shards(plan, markers, storage, in_storage, layout, report, shard_files)
        listed = storage.list_tree(layout.predictions_dir, sizes=False)
        with ExitStack() as stack:
            written, copies, rebuilt = _write_parts(plan, markers, storage, layout, stack, shard_files, listed)
            faults.point("merge.validated")
            _check_still_ours(plan, storage, layout, versions, markers)  # before any part is committed
        report.parts = len(written)
        # Only once every shard passed, like the parts written above; many at once on an object store.
        storage.map(lambda pair: storage.copy(*pair), copies)
        files = storage.map(lambda item: storage.file_record(layout.part(item[0])), rebuilt)
        records = {p: {"part_shards": ids, "part_file": f} for (p, ids), f in zip(rebuilt, files, strict=True)}
        _remove_stale(plan, storage, layout, written, listed)
        if failed:
            report.missing_keys = _record_missing(plan, failed, storage, in_storage, layout)
        else:
            storage.remove(Storage.join(layout.root, MISSING_KEYS))  # a partial result's list, now complete
    except _Invalid as exc:
        report.failures.insert(0, str(exc))
        return _finish(plan, storage, layout, report, results, started, state="invalid", versions=versions)
    except BatchInferError as exc:  # a write failed (a full disk, say): the manifest says so, not "running"
        report.failures.insert(0, str(exc))
        _finish(plan, storage, layout, report, results, started, state="failed", versions=versions)
        if exc.transient:
            raise  # the task retries what may pass
        return report
    report.ok = True
    state = "partial" if failed else "succeeded"
    parts = {**written, **records}
    return _finish(
        plan, storage, layout, report, results, started, state=state, versions=versions, merged=markers, parts=parts
    )


MISSING_KEYS = "missing_keys.parquet"


def _over_error_policy(plan: Plan, markers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Committed shards with more error rows than this run's --max-error-ratio allows (the policy is the
    run's: a rerun with a stricter ratio holds every shard to it, not only those it scores)."""
    ratio = plan.config.output.max_error_ratio
    over = {}
    for shard_id, marker in markers.items():
        errors, rows = int(marker.get("rows_error") or 0), int(marker.get("rows_in") or 0)
        if errors and errors / max(rows, 1) > ratio:
            over[shard_id] = f"{errors} of {rows} rows cannot be scored (see errors/); --max-error-ratio is {ratio}"
    return over


def _marker_versions(storage: Storage, layout: Layout) -> dict[str, str]:
    """Each marker's size and version tag, from one listing."""
    return {
        name.removesuffix(".json"): f"{info.size}:{info.version}"
        for name, info in storage.list_tree(layout.markers_dir).items()
        if name.endswith(".json") and "/" not in name and not name.startswith(".")
    }


def _check_still_ours(
    plan: Plan, storage: Storage, layout: Layout, versions: dict[str, str], markers: dict[str, dict[str, Any]]
) -> None:
    """The output is still this run's: the run's hold on it, the manifest it wrote at the start, and the
    markers of the shards it merged, unchanged since it read them."""
    try:
        outputlock.verify(plan.run_id)
    except BatchInferError as exc:
        raise _Invalid(str(exc)) from None
    try:
        current = storage.read_json(layout.manifest)
    except BatchInferError:
        current = {}
    if current and current.get("run_id") != plan.run_id:  # no manifest: no run has claimed the output
        raise _Invalid(
            f"{layout.manifest} was written by another run ({current.get('run_id') or 'unknown'}) while this one "
            f"ran; nothing was marked as succeeded"
        )
    now = _marker_versions(storage, layout)
    changed = sorted(k for k in markers if now.get(k) != versions.get(k))
    if changed:
        raise _Invalid(
            f"shard {changed[0]}: its marker changed while this run merged it (another run wrote it); "
            f"nothing was marked as succeeded"
        )


def committed_markers(
    plan: Plan,
    results: dict[str, dict[str, Any]],
    storage: Storage,
    layout: Layout,
    shard_files: dict[str, FileInfo],
) -> dict[str, dict[str, Any]]:
    """The markers of planned shards that are committed and whose file is there: those read when planning,
    where still present, and those this run committed, read now."""
    present = {name.removesuffix(".json") for name in storage.list_names(layout.markers_dir)}
    known = {s.shard_id: plan.done[s.shard_id] for s in plan.shards if s.shard_id in plan.done}
    unread = [s for s in plan.shards if s.shard_id in present and (s.shard_id in results or s.shard_id not in known)]
    fresh = storage.map(lambda s: read_marker(storage, plan.settings.output_uri, s.shard_id), unread)
    markers = {k: v for k, v in known.items() if k in present and k not in results}
    for shard, marker in zip(unread, fresh, strict=True):
        if is_done(marker, shard, plan.settings):
            markers[shard.shard_id] = marker  # type: ignore[assignment]
    gone = [k for k in markers if f"{k}.parquet" not in shard_files]
    for shard_id in gone:  # a marker without its data proves nothing: the shard is scored again
        log.warning("shard %s has a marker but its file is gone; it is scored again", shard_id)
        del markers[shard_id]
    return markers


def _check_committed_shards(
    plan: Plan,
    markers: dict[str, dict[str, Any]],
    storage: Storage,
    in_storage: Storage,
    layout: Layout,
    report: RunReport,
    shard_files: dict[str, FileInfo],
) -> None:
    """Each committed shard from its marker and the listing: row counts, one schema, files still the ones
    committed. A shard whose file changed is checked in full to name what is wrong, and loses its marker
    (it is scored again); every shard is looked at, so one run finds every damaged shard."""
    error_files = storage.list_tree(layout.errors_dir) if any(m.get("rows_error") for m in markers.values()) else {}
    schemas: dict[str, str] = {}
    for shard in plan.shards:
        marker = markers.get(shard.shard_id)
        if marker is None:
            continue
        where = f"shard {shard.shard_id} ({shard.partition_uri})"
        problem = _committed_problem(shard, marker, storage, layout, shard_files, error_files)
        if problem:
            try:
                _validated_shard(plan, shard, marker, storage, in_storage, layout)
                reason = f"{where}: {problem}"
            except _Invalid as exc:
                reason = str(exc)
            _forget_damaged(storage, layout, shard, reason, report)
            continue
        schema = marker.get("schema")
        if schema and schemas.setdefault("first", schema) != schema:
            raise _Invalid(f"{where}: schema check failed: its columns differ from the other shards'")
        report.rows_out += int(marker["rows_out"])
        report.rows_error += int(marker["rows_error"])
    if report.damaged:
        damaged, more = report.damaged[0], len(report.damaged) - 1
        also = f" (and {more} more shard(s))" if more else ""
        raise _Invalid(f"{report.failed_shards[damaged]}; its marker was removed, so the shard is scored again{also}")
    detail = "at commit; files unchanged since (size and checksum)"
    kinds = ("schema", "row counts", "keys match the input", "finite", f"{plan.settings.output.kind} outputs")
    report.checks.extend(Check(name, True, detail) for name in kinds)


def _committed_problem(
    shard: Shard,
    marker: dict[str, Any],
    storage: Storage,
    layout: Layout,
    shard_files: dict[str, FileInfo],
    error_files: dict[str, FileInfo],
) -> str:
    """What is wrong with a committed shard, from its marker and the listing alone ("" when nothing)."""
    rows_out, rows_error = marker.get("rows_out"), marker.get("rows_error")
    if not isinstance(rows_out, int) or not isinstance(rows_error, int) or rows_out + rows_error != shard.num_rows:
        return f"row counts check failed: marker says {rows_out} output + {rows_error} error rows, planned {shard.num_rows}"
    name = f"{shard.shard_id}.parquet"
    changed = storage.unchanged(layout.shard(shard.shard_id), marker["file"], shard_files.get(name))
    if changed:
        return f"output file changed since it was committed ({changed})"
    if rows_error:
        changed = storage.unchanged(layout.errors(shard.shard_id), marker["errors_file"], error_files.get(name))
        return f"errors file changed since it was committed ({changed})" if changed else ""
    return ""


def _write_parts(
    plan: Plan,
    markers: dict[str, dict[str, Any]],
    storage: Storage,
    layout: Layout,
    stack: ExitStack,
    shard_files: dict[str, FileInfo],
    listed: dict[str, FileInfo],
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """The merged part of each partition, by its name under predictions/ (`Partition.part`).

    A part made of one shard is that shard's file: it is returned as a (shard, part) pair to copy once
    every shard has passed, unless the part is that file already. A part of several shards is written
    again only when its shards or its file changed since the run that wrote it (the manifest's record).
    Returns every part (with the record to keep for it, if any), the copies to make, the parts written.
    """
    written: dict[str, dict[str, Any]] = {}
    copies: list[tuple[str, str]] = []
    rebuilt: list[tuple[str, list[str]]] = []
    by_part: dict[str, list[Shard]] = {}
    for shard in plan.shards:
        if shard.shard_id in markers:
            by_part.setdefault(shard.part, []).append(shard)
    earlier = {e.get("part"): e for e in plan.previous.get("partitions") or [] if isinstance(e, dict)}
    for part, shards in sorted(by_part.items()):
        ids = [s.shard_id for s in shards]
        target = layout.part(part)
        if len(shards) == 1:
            source = layout.shard(ids[0])
            shard_file = shard_files.get(f"{ids[0]}.parquet")
            if not storage.same_file(source, target, markers[ids[0]]["file"], listed.get(part), shard_file):
                copies.append((source, target))
            written[part] = {}
            continue
        before = earlier.get(part) or {}
        record = before.get("part_file")
        if before.get("part_shards") == ids and isinstance(record, dict) and part in listed:
            if not storage.unchanged(target, record, storage.info(target)):
                written[part] = {"part_shards": ids, "part_file": record}
                continue
        tmp = stack.enter_context(storage.atomic_local_file(target, suffix=".parquet"))
        writer: pq.ParquetWriter | None = None
        try:
            for shard in shards:
                table = _read_shard(storage, layout, shard)
                if writer is None:
                    writer = open_writer(tmp, table.schema)
                writer.write_table(table, row_group_size=65_536)
        finally:
            if writer is not None:
                writer.close()
        written[part] = {}
        rebuilt.append((part, ids))
    return written, copies, rebuilt


def _forget_damaged(storage: Storage, layout: Layout, shard: Shard, reason: str, report: RunReport) -> None:
    """A committed shard whose file fails its check is no longer done: its marker goes (data first,
    marker last, undone the other way round), and it is scored again."""
    storage.remove(layout.marker(shard.shard_id))
    log.warning("%s; removed its marker so the shard is scored again", reason)
    report.damaged.append(shard.shard_id)
    report.failed_shards[shard.shard_id] = reason
    report.shards_failed += 1


def _read_shard(storage: Storage, layout: Layout, shard: Shard) -> pa.Table:
    where = f"shard {shard.shard_id} ({shard.partition_uri})"
    try:
        data = storage.read_bytes(layout.shard(shard.shard_id))
        return pq.read_table(pa.BufferReader(data))
    except BatchInferError as exc:
        raise _Invalid(f"{where}: output file unreadable: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise _Invalid(f"{where}: output file is not valid Parquet ({exc})") from None


def _validated_shard(
    plan: Plan,
    shard: Shard,
    marker: dict[str, Any],
    storage: Storage,
    in_storage: Storage,
    layout: Layout,
) -> pa.Table:
    """The shard's output table, checked in full against the plan and the input."""
    settings = plan.settings
    where = f"shard {shard.shard_id} ({shard.partition_uri})"
    table = _read_shard(storage, layout, shard)
    _check_schema(plan, table, where)
    errors = _error_keys(storage, layout, shard, settings.key_column, where)
    # Keys before counts: a lost or repeated row is reported by its key, not only as a count mismatch.
    expected = _read_column(in_storage, shard.partition_uri, settings.key_column, range(shard.rg_start, shard.rg_stop))
    got = pl.concat([pl.from_arrow(table.column(0)).alias("k"), errors.alias("k")])  # type: ignore[union-attr]
    # The runner keeps input order, so without error rows the keys match as they are; sort only otherwise.
    in_order = not len(errors) and got.equals(expected.alias("k"))
    if not in_order and not got.sort().equals(expected.alias("k").sort()):
        extra = got.filter(~got.is_in(expected.implode())).head(1).to_list()
        lost = expected.filter(~expected.is_in(got.implode())).head(1).to_list()
        dup = got.filter(got.is_duplicated()).head(1).to_list()
        what = (
            f"key {lost[0]!r} is missing"
            if lost
            else f"key {dup[0]!r} appears twice"
            if dup
            else f"unexpected key {extra[0]!r}"
            if extra
            else "keys differ"
        )
        raise _Invalid(f"{where}: keys check failed: {what}")
    if table.num_rows + len(errors) != shard.num_rows or marker.get("rows_out") != table.num_rows:
        raise _Invalid(
            f"{where}: row counts check failed: {table.num_rows} output + {len(errors)} error rows, "
            f"planned {shard.num_rows}, marker says {marker.get('rows_out')}"
        )
    _check_values(plan, table, where)
    return table


def _error_keys(storage: Storage, layout: Layout, shard: Shard, key: str, where: str) -> pl.Series:
    uri = layout.errors(shard.shard_id)
    if not storage.exists(uri):
        return pl.Series("k", [])
    try:
        return pl.from_arrow(pq.read_table(pa.BufferReader(storage.read_bytes(uri))).column(key)).alias("k")  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001
        raise _Invalid(f"{where}: errors file unreadable ({exc})") from None


def _check_schema(plan: Plan, table: pa.Table, where: str) -> None:
    settings = plan.settings
    key_type = plan.partitions[0].schema.get(settings.key_column)
    kinds = dict(outputs.expected_schema(settings.output, table.column_names))
    expected = [settings.key_column, *kinds, *settings.passthrough]
    if table.column_names != expected:
        raise _Invalid(f"{where}: schema check failed: columns {table.column_names}, expected {expected}")
    if str(table.schema.field(settings.key_column).type) != key_type:
        raise _Invalid(f"{where}: schema check failed: key type {table.schema.field(0).type}, expected {key_type}")
    for name, dtype in kinds.items():
        if not table.schema.field(name).type.equals(dtype):
            raise _Invalid(f"{where}: schema check failed: {name} is {table.schema.field(name).type}, expected {dtype}")


def _check_values(plan: Plan, table: pa.Table, where: str) -> None:
    """The checks of the run's output kind (batchinfer/outputs.py), named for the shard."""
    try:
        outputs.check(table, plan.settings.output)
    except outputs.OutputInvalid as exc:
        raise _Invalid(f"{where}: {exc}") from None


def _check_input_unchanged(plan: Plan, in_storage: Storage, report: RunReport) -> None:
    """No key appears twice: planning found the input keys unique, shards do not overlap, and each shard's
    keys equal its input rows' keys (checked at its commit). That holds only while the input is the one
    planned, so check the fingerprint of every partition this run had shards to score in. Shards done before
    hold what the input held when planned, and the next run plans again.
    """
    scored = {s.partition_uri for s in plan.pending}
    parts = [part for part in plan.partitions if part.uri in scored]
    now = in_storage.map(lambda part: current_fingerprint(in_storage, part), parts)
    for part, fingerprint in zip(parts, now, strict=True):
        if fingerprint != part.fingerprint:
            raise _Invalid(f"{part.uri}: input changed during the run (size or content differs); run again")
    report.checks.append(Check("keys unique", True, "input keys unique when planned; partitions unchanged"))


def _remove_stale(
    plan: Plan, storage: Storage, layout: Layout, written: dict[str, Any], listed: dict[str, FileInfo]
) -> None:
    """Drop merged parts (of `listed`, what predictions/ held before) and shard files that no longer belong
    to the current input."""
    removed = False
    for relative in listed:
        if relative not in written:
            storage.remove(Storage.join(layout.predictions_dir, relative))
            removed = removed or "/" in relative
    if removed:
        storage.remove_empty_folders(layout.predictions_dir)
    planned = {s.shard_id for s in plan.shards}
    for folder, suffix in (
        (layout.markers_dir, ".json"),
        (layout.shards_dir, ".parquet"),
        (layout.errors_dir, ".parquet"),
    ):
        for name in storage.list_names(folder):
            if name.endswith(suffix) and not name.startswith(".") and name.removesuffix(suffix) not in planned:
                storage.remove(Storage.join(folder, name))


def _record_missing(plan: Plan, failed: list[Shard], storage: Storage, in_storage: Storage, layout: Layout) -> int:
    """For a partial result: write the keys of the failed shards to missing_keys.parquet."""
    keys = [
        _read_column(in_storage, s.partition_uri, plan.settings.key_column, range(s.rg_start, s.rg_stop))
        for s in failed
    ]
    series = pl.concat(keys) if keys else pl.Series(plan.settings.key_column, [])
    uri = Storage.join(layout.root, MISSING_KEYS)
    with storage.atomic_local_file(uri, suffix=".parquet") as tmp:
        series.to_frame().write_parquet(tmp)
    return len(series)


def _finish(
    plan: Plan,
    storage: Storage,
    layout: Layout,
    report: RunReport,
    results: dict[str, dict[str, Any]],
    started: float,
    *,
    state: str,
    versions: dict[str, str],
    merged: dict[str, dict[str, Any]] | None = None,
    parts: dict[str, dict[str, Any]] | None = None,
) -> RunReport:
    """Record the outcome in the manifest, then `_SUCCESS` if it passed; nothing at all if the output is no
    longer this run's (another run's manifest is never overwritten)."""
    report.seconds = round(time.perf_counter() - started, 3)
    try:
        _check_still_ours(plan, storage, layout, versions, merged or {})
    except _Invalid as exc:
        report.ok = False
        report.failures.insert(0, str(exc))
        log.error("merge-and-validate: %s", exc)
        return report
    validation = {
        "ok": report.ok,
        "checks": [asdict(c) for c in report.checks],
        "failures": report.failures,
        "failed_shards": report.failed_shards,
        "missing_keys": report.missing_keys,
        "missing_keys_file": "missing_keys.parquet" if report.missing_keys else None,
    }
    data = manifest(plan, state=state, results=results, validation=validation)
    if parts is not None:  # the record of each part of several shards, for the next run to keep it
        for entry in data["partitions"]:
            entry.pop("part_shards", None)
            entry.pop("part_file", None)
            entry.update(parts.get(entry["part"]) or {})
    data["totals"].update({"rows_out": report.rows_out, "rows_error": report.rows_error, "parts": report.parts})
    write_manifest(storage, layout, data)
    if report.ok:
        storage.write_bytes(layout.success, b"")
    log.info("merge-and-validate: %s (%d rows out, %d error rows)", state, report.rows_out, report.rows_error)
    return report
