"""The `batchinfer` command: run, plan, rerun, status, demo, serve.

Exit status: 0 success; 1 the run finished but failed (a shard or a check);
2 bad input, parameters or environment, reported before any work where possible.
Errors are one line on stderr; `--verbose` shows Prefect's logs and tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from batchinfer.config import FLAT_FIELDS, GROUPS, RunConfig, flag, flat_name, make_config
from batchinfer.errors import BatchInferError, ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


# For a Prefect server on SQLite (the embedded one, or `prefect server start` as the README shows): its
# task-run recorder writes the events of a second in one transaction instead of one transaction per event.
# Each commit between the read and the write of a task's tag check fails that check ("database is
# locked"), and the client retries it 2 s later (BENCHMARKS.md, "A task tag's cost").
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def quiet_prefect(verbose: bool) -> None:
    """Environment for an in-process Prefect run: no telemetry, quiet console, our logs in the UI."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "batchinfer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_UVICORN_LEVEL", "CRITICAL")


# -- argument parsing -------------------------------------------------------------


def _add_config_arguments(parser: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    """One flag per field of the config groups, from the schema itself: its help, type, choices and default.

    Flags left out keep the schema's default (argparse.SUPPRESS), so each default is declared once.
    """
    for group in groups:
        for name, info in GROUPS[group].model_fields.items():
            default = info.get_default(call_default_factory=True)
            shown = "" if info.is_required() or default in (None, [], {}) else f" (default: {default})"
            options: dict[str, Any] = {"help": f"{info.description}{shown}", "default": argparse.SUPPRESS}
            kind = info.annotation
            literal = [a for a in typing.get_args(kind) if typing.get_origin(a) is typing.Literal]
            if literal:  # an optional choice, such as `OutputKind | None`
                kind = literal[0]
            if kind is bool:
                options["action"] = "store_true"
            elif typing.get_origin(kind) is typing.Literal:
                options["choices"] = list(typing.get_args(kind))
            elif int in (kind, *typing.get_args(kind)):
                options["type"] = _int(auto=name == "batch_size")
            elif kind is float:
                options["type"] = _float()
            if info.is_required():
                options["required"] = True
            parser.add_argument(flag(group, name), dest=flat_name(group, name), **options)
    parser.add_argument("--verbose", "-v", action="store_true", help="show Prefect's logs and tracebacks")


def _schema_argument(parser: argparse.ArgumentParser, group: str, name: str, *, note: str = "", **options: Any) -> None:
    """A flag of a command that takes one schema field as a string: the schema's help and, unless given, its
    default."""
    info = GROUPS[group].model_fields[name]
    options.setdefault("default", info.get_default(call_default_factory=True))
    shown = note or (f"(default: {options['default']})" if options["default"] else "")
    parser.add_argument(flag(group, name), help=f"{info.description} {shown}".strip(), **options)


class _Auto(int):
    """0 spelt 'auto' on the command line: the config's "auto", told apart from a literal 0 (refused)."""

    def __repr__(self) -> str:
        return "'auto'"


def _int(*, auto: bool = False) -> Callable[[str], int]:
    """A whole-number parser; with `auto`, the word 'auto' is accepted and becomes 0 (the config's "auto")."""

    def parse(text: str) -> int:
        if auto and text.strip().lower() == "auto":
            return _Auto(0)
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None

    return parse


def _float() -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"batchinfer: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchinfer", description="Batch inference over Parquet with PyTorch models, on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="score a dataset (reruns only what is missing)")
    _add_config_arguments(run, ["input", "model", "compute", "output"])

    plan = sub.add_parser("plan", help="print partitions and shards without running anything")
    _add_config_arguments(plan, ["input", "model", "compute"])
    plan.add_argument(
        "--output",
        dest="output_uri",
        default=None,
        help="also show what a run into this output would do: shards skipped as done, scored, rescored, removed",
    )

    rerun = sub.add_parser("rerun", help="rerun the failed or missing shards of the run recorded in an output")
    rerun.add_argument("--output", required=True, help="the output of the recorded run")
    _schema_argument(rerun, "input", "storage_options", default="")
    _schema_argument(rerun, "compute", "devices", default=None, note="(default: the recorded run's)")
    rerun.add_argument("--verbose", "-v", action="store_true")

    status = sub.add_parser("status", help="print each shard's state from the markers")
    status.add_argument("--output", required=True, help="the output of the recorded run")
    _schema_argument(status, "input", "storage_options", default="")

    demo = sub.add_parser("demo", help="generate sample data and a model, then run the flow on both models")
    demo.add_argument("--workdir", default=None, help="folder for data, model and outputs (default: ./batchinfer-demo)")
    demo.add_argument("--rows", type=_int(), default=200_000)
    demo.add_argument("--sentences", type=_int(), default=2_000)
    _schema_argument(demo, "compute", "devices")
    demo.add_argument("--verbose", "-v", action="store_true")

    serve = sub.add_parser(
        "serve",
        help="serve the flow as a deployment (Prefect's serve): runs come from the UI, the API or a cron schedule",
    )
    serve.add_argument("--name", default="batchinfer", help="deployment name (default: batchinfer)")
    serve.add_argument("--cron", default=None, help="cron schedule, e.g. '0 2 * * *'")
    serve.add_argument("--timezone", default="UTC", help="time zone of --cron (default: UTC)")
    serve.add_argument(
        "--params",
        default="",
        help='default parameters as JSON, grouped like the UI form: {"input": {"uri": ...}, "model": {...}, '
        '"compute": {...}, "output": {...}}',
    )
    serve.add_argument("--input", help="default input URI (sets input.uri)")
    serve.add_argument("--output", help="default output URI (sets output.uri)")
    serve.add_argument("--model", help="default model (sets model.model)")
    serve.add_argument("--checkpoint", help="default checkpoint (sets model.checkpoint)")
    serve.add_argument("--limit", type=_int(), default=None, help="most flow runs at once (default: no limit)")
    for kind, what in (("input", "inputs"), ("output", "outputs"), ("model", "models and checkpoints")):
        serve.add_argument(
            f"--allow-{kind}",
            action="append",
            default=None,
            metavar="PREFIX",
            help=f"runs may read {what} only under PREFIX (repeatable; a path, s3://bucket/prefix/"
            + (", a built-in model name or a module prefix such as mypackage.models." if kind == "model" else "")
            + ")",
        )
    serve.add_argument("--verbose", "-v", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace, *, output: str | None = None) -> RunConfig:
    """The run's config from the flags given; flags left out keep the schema's defaults."""
    given = {name: value for name, value in vars(args).items() if name in FLAT_FIELDS}
    if output is not None:
        given["output_uri"] = output
    batch = given.get("batch_size")
    # The config reads batch size 0 as "auto"; on the command line that is spelt 'auto', and a literal 0 is a mistake.
    if batch is not None and batch < 1 and not isinstance(batch, _Auto):
        raise ConfigError(f"--batch-size: must be a positive number of rows, or 'auto' (got {batch})")
    return make_config(**given)


# -- commands -------------------------------------------------------------------


def run_flow(config: RunConfig, *, verbose: bool = False, show_progress: bool | None = None) -> dict[str, Any]:
    """Check what can be checked without Prefect, then run the flow in this process."""
    from batchinfer.config import uses_secret_blocks

    config = config.dated()  # the run's parameters hold the dates it scores, not the templates
    needs_prefect = uses_secret_blocks(config.storage_options)  # Secret blocks are read through Prefect's API
    if not needs_prefect:
        check_up_front(config)  # bad input fails here, before a server starts
    quiet_prefect(verbose)
    from batchinfer.devices import freeze_imports
    from flows.batch_inference import batch_inference

    freeze_imports()  # torch and Prefect are imported by now
    started = time.perf_counter()
    with prefect_api(), _progress_bar(show_progress), _quiet_console(verbose):
        if needs_prefect:
            check_up_front(config)
        state = batch_inference(**config.parameters(), return_state=True)
    seconds = time.perf_counter() - started
    if state.is_completed():
        report = dict(state.result())
        report["wall_seconds"] = round(seconds, 3)
        return report
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BatchInferError):
        raise exc
    message = state.message or state.name
    if isinstance(exc, BaseException) and not str(message).strip():
        message = f"{type(exc).__name__}: {exc}"
    raise RunFailed(str(message).strip().splitlines()[0] if message else "the run failed")


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Prefect's settings for a run in this process: PREFECT_API_URL's server, else one embedded server.

    Prefect starts an embedded server in every process that has no API URL, so each worker process of a
    process pool (or of a local Dask or Ray) would start its own and report to it. Starting it here and
    exporting its URL gives every process of the run the same server, and lets an interrupt stop it.
    The flow's heartbeat thread is off: a run in this process is watched by this process, and the sync
    engine would otherwise wait up to a second at the end of every run (BENCHMARKS.md).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if PREFECT_API_URL.value():
        check_api(PREFECT_API_URL.value())
    else:
        from prefect.server.api.server import SubprocessASGIServer

        # The watchdog starts first: a kill while the server starts up must not leave it running either.
        watchdog = _end_with_this_process()
        for name, value in SERVER_SETTINGS.items():  # the server's process takes this environment
            os.environ.setdefault(name, value)
        server = SubprocessASGIServer()
        server.start()  # stopped when this process exits (Prefect's atexit)
        watchdog(server.server_process.pid)
        os.environ["PREFECT_API_URL"] = server.api_url
        updates[PREFECT_API_URL] = server.api_url
    with temporary_settings(updates=updates):
        yield


def check_api(url: str) -> None:
    """Refuse at once, in one line, when PREFECT_API_URL names a server that does not answer."""
    from prefect.client.orchestration import get_client

    from batchinfer.config import scrub

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        reason = str(problem).strip().splitlines()[0][:200] if str(problem).strip() else type(problem).__name__
        raise ConfigError(
            f"the Prefect API at {scrub(url)} does not answer ({scrub(reason)}); start that server, "
            f"or unset PREFECT_API_URL to run on an embedded one"
        )


# Waits for EOF on stdin, the read end of a pipe whose write end only the parent holds, then ends the
# processes it was told of (one pid a line) and, where /proc exists, every process whose environment holds
# its token: the parent's children started after the watchdog, even those whose pid it never learnt.
_WATCHDOG = """
import os, signal, sys, time
token = sys.argv[1].encode()
pids = {int(line) for line in sys.stdin.buffer.read().split() if line.isdigit()}
def marked():
    found = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if token in handle.read().split(b"\\0"):
                        found.add(int(entry))
            except OSError:
                pass
    return found
targets = pids | marked()
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in list(targets):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            targets.discard(pid)
    for _ in range(50):
        if not targets:
            sys.exit(0)
        time.sleep(0.1)
        for pid in list(targets):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                targets.discard(pid)
"""
_WATCHDOG_ENV = "BATCHINFER_WATCHED_BY"
_watchdog_pipes: list[int] = []


def _end_with_this_process() -> Callable[[int], None]:
    """End the processes this one starts from now on (the embedded server) when it is gone, even SIGKILLed,
    when atexit never runs. Returns a function that names a process to the watchdog by pid.

    A tiny watchdog holds the read end of a pipe; the kernel closes the write end when this process dies,
    however it dies, and the watchdog then stops what this process started instead of leaving it running as
    an orphan. Children inherit a token in their environment, so one started but not yet named is found too.
    """
    import secrets
    import subprocess

    token = f"{_WATCHDOG_ENV}={os.getpid()}-{secrets.token_hex(8)}"
    read, write = os.pipe()
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, token], stdin=read, start_new_session=True)
    os.close(read)
    _watchdog_pipes.append(write)  # never closed here: it closes with the process
    name, value = token.split("=", 1)
    os.environ[name] = value

    def watch(pid: int) -> None:
        os.write(write, f"{pid}\n".encode())

    return watch


def check_up_front(config: RunConfig) -> None:
    """Everything a run can reject without scoring: parameters, files, schemas, keys, the model, the output
    (another run holding it, or holding another run's results)."""
    from batchinfer.outputlock import check_free
    from batchinfer.pipeline import check_keys_once, check_output, key_index, prepare
    from batchinfer.storage import Storage

    plan = prepare(config, check_existing=False)  # plan.previous: the output's run of this config, if any
    out = Storage(config.output.uri, config.storage_options)
    known = {} if config.output.overwrite else key_index(plan.previous)
    in_storage = Storage(config.input.uri, config.storage_options)
    check_keys_once(in_storage, plan.partitions, config.input.key_column, known)
    out.require_bucket(config.output.uri, "--output")
    check_free(config.output.uri, config.storage_options)
    if not config.output.overwrite and not plan.previous:  # with --overwrite the flow replaces the old run
        check_output(out, config, plan.settings.model_fingerprint)  # refuses another configuration's output


@contextlib.contextmanager
def _quiet_console(verbose: bool) -> Iterator[None]:
    """Without --verbose, Prefect's console handlers stay silent during the run: stderr is ours, one line.

    Settings made before `import prefect` cannot do this once Prefect is already imported (a
    test session, a notebook), so the handlers themselves are raised for the run and restored.
    """
    if verbose:
        yield
        return
    raised: dict[int, tuple[logging.Handler, int]] = {}
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and type(handler).__module__.startswith("prefect."):
                raised.setdefault(id(handler), (handler, handler.level))
                handler.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for handler, level in raised.values():
            handler.setLevel(level)


class RunFailed(Exception):
    """The flow ran but ended Failed (a shard or a check); the message names them."""


class _progress_bar:
    """A terminal progress bar fed by core events (shards, rows, rows/s); off when not a terminal."""

    def __init__(self, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def __enter__(self) -> _progress_bar:
        if not self.enabled:
            return self
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from batchinfer import progress

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.rows = self.bar.add_task("rows", total=None, rate="")
        self.shards = self.bar.add_task("shards", total=None, rate="")
        self.started = time.perf_counter()
        self.done_rows = 0

        def on_event(event: progress.Event) -> None:
            if event.kind == "plan":
                self.bar.update(self.rows, total=event.total_rows)
                self.bar.update(self.shards, total=event.total_shards)
            elif event.kind == "rows":
                self.done_rows += event.rows
                rate = self.done_rows / max(time.perf_counter() - self.started, 1e-9)
                self.bar.update(self.rows, advance=event.rows, rate=f"{rate:,.0f} rows/s")
            elif event.kind == "shard_skipped":
                self.bar.update(self.rows, advance=event.rows)
                self.bar.update(self.shards, advance=1)
            elif event.kind == "shard_done":
                self.bar.update(self.shards, advance=1)

        self.unsubscribe = progress.subscribe(on_event)
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
            self.unsubscribe()


def summarize(report: dict[str, Any]) -> str:
    """One line per run; rows/s counts the flow's own time, Prefect's server start-up is shown apart."""
    seconds = report.get("flow_seconds") or report.get("wall_seconds") or report.get("seconds") or 0
    rate = report.get("rows", 0) / seconds if seconds else 0
    state = "passed" if report.get("ok") else "FAILED"
    startup = ""
    if report.get("flow_seconds") and report.get("wall_seconds"):
        startup = f" (+{max(report['wall_seconds'] - report['flow_seconds'], 0):.1f} s starting Prefect)"
    return (
        f"{report.get('rows', 0):,} rows ({report.get('rows_out', 0):,} scored, {report.get('rows_error', 0):,} errors) "
        f"in {report.get('shards', 0)} shards ({report.get('shards_run', 0)} run, {report.get('shards_skipped', 0)} "
        f"already done), {seconds:.1f} s{startup}, {rate:,.0f} rows/s; validation {state}; "
        f"output: {report.get('output_uri')}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    report = run_flow(config_from_args(args), verbose=args.verbose)
    print(summarize(report))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Partitions and shards; with --output, what a run there would do with each shard. Nothing is written."""
    from batchinfer.pipeline import as_recorded_model, changes, check_output, find_done, prepare, runs_model_code
    from batchinfer.storage import Storage

    output = getattr(args, "output_uri", None)
    config = config_from_args(args, output=output or "/nonexistent-plan-only")
    # Models are code: the plan is made without importing, loading or running one (only the built-in
    # models' files, which are data, are read).
    plan = prepare(config, check_existing=False, run_model=False)
    actions: dict[str, Any] = {}
    removed: list[Any] = []
    if output:
        out = Storage(plan.config.output.uri, plan.config.storage_options)
        if runs_model_code(plan.config.model.model):
            plan = as_recorded_model(plan)
            print(
                f"the model's code is not run by plan: shards are compared as if it were the model recorded at {output}"
            )
        if not plan.previous:  # an output of another configuration is refused; plan never overwrites
            check_output(out, plan.config, plan.settings.model_fingerprint)
        plan.done = find_done(out, plan)
        for change in changes(plan):
            if change.action == "remove":
                removed.append(change)
            else:
                actions[change.shard_id] = change
    print(f"{len(plan.partitions)} partitions, {len(plan.shards)} shards, {plan.total_rows:,} rows")
    if output:
        counts = {a: sum(1 for c in [*actions.values(), *removed] if c.action == a) for a in _ACTIONS}
        print(f"at {plan.config.output.uri}: " + ", ".join(f"{counts[a]} {word}" for a, word in _ACTIONS.items()))
    for index, part in enumerate(plan.partitions):
        hive = "".join(f", {k}={v}" for k, v in part.hive)
        print(f"partition {index:05d} {part.uri}: {part.num_rows:,} rows, {len(part.row_groups)} row groups{hive}")
        for shard in (s for s in plan.shards if s.partition_index == index):
            change = actions.get(shard.shard_id)
            what = f"  {_ACTIONS[change.action]} ({change.why})" if change else ""
            print(
                f"  shard {shard.shard_id}: rows {shard.row_start:,}..{shard.row_start + shard.num_rows:,} "
                f"({shard.num_rows:,} rows, row groups {shard.rg_start}..{shard.rg_stop - 1}){what}"
            )
    for change in removed:
        print(
            f"shard {change.shard_id}: {_ACTIONS['remove']} ({change.partition_uri or 'unknown partition'}: {change.why})"
        )
    return EXIT_OK


_ACTIONS = {"skip": "skipped as done", "score": "scored", "rescore": "rescored", "remove": "removed"}


def _manifest(output: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    from batchinfer.layout import Layout
    from batchinfer.storage import Storage

    storage = Storage(output, storage_options)
    uri = Layout(output.rstrip("/")).manifest
    if not storage.exists(uri):
        raise ConfigError(f"{output} holds no batchinfer run (no manifest.json)")
    return storage.read_json(uri)


def cmd_status(args: argparse.Namespace) -> int:
    from batchinfer.config import parse_storage_options
    from batchinfer.layout import Layout
    from batchinfer.storage import Storage

    options = parse_storage_options(args.storage_options)
    data = _manifest(args.output, options)
    storage = Storage(args.output, options)
    layout = Layout(args.output.rstrip("/"))
    markers = {n.removesuffix(".json") for n in storage.list_names(layout.markers_dir) if n.endswith(".json")}
    done = 0
    for shard in data.get("shards", []):
        marker = None
        if shard["shard_id"] in markers:
            marker = storage.read_json(layout.marker(shard["shard_id"]))
        ok = bool(marker and marker.get("model_fingerprint") == data.get("model_fingerprint"))
        done += ok
        state = "done" if ok else shard.get("state", "pending")
        state = "pending" if state == "done" and not ok else state
        detail = (
            f"{marker.get('seconds', 0):.2f} s on {marker.get('device')}"
            if ok and marker
            else (shard.get("error") or "")
        )
        print(f"{shard['shard_id']}  {state:<8} {shard['num_rows']:>10,} rows  {shard['partition_uri']}  {detail}")
    success = storage.exists(layout.success)
    state = data.get("state")
    if state == "running":
        from batchinfer.outputlock import holder

        held = holder(args.output, options)
        state = f"running ({held})" if held else "interrupted (no run holds the output; rerun to finish)"
    print(
        f"{done}/{len(data.get('shards', []))} shards done; run state: {state}; _SUCCESS {'present' if success else 'absent'}"
    )
    return EXIT_OK


def recorded_config(recorded: dict[str, Any], options: dict[str, Any]) -> RunConfig:
    """The config a manifest records, with the storage options given now in place of the masked ones."""
    if "input" in recorded and isinstance(recorded["input"], dict):
        flat = {flat_name(g, f): v for g in GROUPS for f, v in (recorded.get(g) or {}).items()}
    else:  # a manifest written before the config had groups
        flat = {k: v for k, v in recorded.items() if k in FLAT_FIELDS}
    from batchinfer.config import release_secrets

    kept = release_secrets(flat.get("storage_options") or {})  # masked values dropped, at any depth
    flat["storage_options"] = {**kept, **options}
    return make_config(**flat)


def cmd_rerun(args: argparse.Namespace) -> int:
    from batchinfer.config import parse_storage_options

    options = parse_storage_options(args.storage_options)
    config = recorded_config(dict(_manifest(args.output, options).get("config") or {}), options)
    if args.devices:
        config = config.replace(devices=args.devices)
    report = run_flow(config, verbose=args.verbose)
    print(summarize(report))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from batchinfer import demo

    workdir = demo.demo_workdir(args.workdir)
    print(f"demo workdir: {workdir}")
    started = time.perf_counter()
    demo.write_tabular(workdir / "data" / "tabular", args.rows, partitions=8)
    demo.write_text(workdir / "data" / "text", args.sentences, partitions=2)
    checkpoint = demo.train_mlp(workdir / "models" / "mlp.safetensors")
    print(
        f"generated {args.rows:,} tabular rows, {args.sentences:,} sentences and trained an MLP "
        f"in {time.perf_counter() - started:.1f} s"
    )
    jobs = [
        (
            "tabular (mlp)",
            make_config(
                input_uri=str(workdir / "data" / "tabular"),
                output_uri=str(workdir / "output" / "tabular"),
                model="mlp",
                checkpoint=str(checkpoint),
                devices=args.devices,
                shard_rows=50_000,
                overwrite=True,
            ),
        ),
        (
            "text (minilm)",
            make_config(
                input_uri=str(workdir / "data" / "text"),
                output_uri=str(workdir / "output" / "text"),
                model="minilm",
                text_column="text",
                batch_size=64,
                devices=args.devices,
                shard_rows=1_000,
                overwrite=True,
            ),
        ),
    ]
    for name, config in jobs:
        report = run_flow(config, verbose=args.verbose)
        print(f"{name}: {summarize(report)}")
    print(
        f"read the results with polars: pl.read_parquet('{workdir / 'output' / 'tabular' / 'predictions'}/*.parquet')"
    )
    return EXIT_OK


def serve_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment's default parameters from --params and the shortcuts, each group checked up front.

    A run that changes one field of a group sends the whole group (the UI form does), so every group
    given here must be complete on its own.
    """
    from pydantic import ValidationError

    groups = GROUPS
    try:
        params = json.loads(args.params) if args.params.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--params is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ConfigError('--params must be a JSON object of groups, e.g. \'{"model": {"model": "mlp"}}\'')
    unknown = sorted(set(params) - set(groups))
    if unknown:
        raise ConfigError(f"--params: unknown group {unknown[0]!r} (use {', '.join(groups)})")
    shortcuts = [("input", "uri", args.input), ("output", "uri", args.output)]
    shortcuts += [("model", "model", args.model), ("model", "checkpoint", args.checkpoint)]
    for group, field, value in shortcuts:
        if value is not None:
            params.setdefault(group, {})[field] = value
    for group, values in params.items():
        try:
            params[group] = groups[group].model_validate(values).model_dump(mode="json", exclude_unset=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in (group, *error["loc"]))
            raise ConfigError(f"--params: {where}: {error['msg']}") from None
    _refuse_clear_credentials(params)
    return params


def _refuse_clear_credentials(params: dict[str, Any]) -> None:
    """A deployment's parameters are stored by the server and shown in its UI: no credential in clear."""
    from batchinfer.config import clear_credentials

    found = clear_credentials((params.get("input") or {}).get("storage_options") or {})
    if found:
        raise ConfigError(
            f"--params: input.storage_options.{found[0]} would be stored in clear in the deployment; name an "
            'environment variable ({"$env": "NAME"}) or a Prefect Secret block ({"$secret": "NAME"}) instead'
        )


def allow_prefixes(args: argparse.Namespace) -> None:
    """`--allow-*` become the environment every flow run of this process inherits (checked by each run)."""
    from batchinfer.config import absolute_uri
    from batchinfer.pipeline import ALLOWED_ENV

    for kind, variable in ALLOWED_ENV.items():
        prefixes = getattr(args, f"allow_{kind}", None)
        if prefixes:
            paths = [p if kind == "model" and "/" not in p else absolute_uri(p) for p in prefixes]
            os.environ[variable] = ",".join(paths)


def cmd_serve(args: argparse.Namespace) -> int:
    """Register the deployment and run its flow runs in subprocesses until interrupted."""
    parameters = serve_parameters(args)
    missing = [group for group in ("input", "model", "output") if group not in parameters]
    if args.cron and missing:
        # Scheduled runs get only the deployment's defaults: without these groups each would fail.
        raise ConfigError(f"--cron needs default {', '.join(missing)} (--input, --model, --output or --params)")
    allow_prefixes(args)
    quiet_prefect(args.verbose)
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL
    from prefect.types.entrypoint import EntrypointType

    from batchinfer.devices import freeze_imports
    from flows.batch_inference import batch_inference

    freeze_imports()  # torch and Prefect are imported by now
    if PREFECT_API_URL.value():
        check_api(PREFECT_API_URL.value())

    if args.cron:
        try:
            schedules = [Cron(args.cron, timezone=args.timezone)]
        except ValueError as exc:
            raise ConfigError(f"--cron {args.cron!r} / --timezone {args.timezone!r}: {exc}") from None
    else:
        schedules = None
    batch_inference.serve(
        name=args.name,
        schedules=schedules,
        parameters=parameters,
        limit=args.limit,
        enforce_parameter_schema=True,
        # The installed package, not a file path: flow runs start the same from any directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "plan": cmd_plan,
    "rerun": cmd_rerun,
    "status": cmd_status,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the run stops, the line says so, and nothing is left running."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    if verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        core = logging.getLogger("batchinfer")
        core.addHandler(handler)
        core.setLevel(logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return COMMANDS[args.command](args)
    except BatchInferError as exc:
        _fail(f"batchinfer: error: {exc}", verbose)
        return EXIT_BAD_INPUT
    except RunFailed as exc:
        _fail(f"batchinfer: run failed: {exc}", verbose)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        _fail(f"batchinfer: {how}; rerun the same command to finish the missing shards", verbose)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `batchinfer` command. After an interrupt, worker processes are stopped before the process ends,
    and the embedded Prefect server with it, so nothing is left running (the flow already stopped its shards)."""
    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        stop_children()
    sys.exit(code)


def stop_children(timeout: float = 5.0) -> None:
    """Stop this process's worker processes. The embedded server stops at exit (Prefect's atexit), after
    Prefect has sent what it still holds for it."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout)
        if child.is_alive():
            child.kill()


def _fail(line: str, verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exc()
    from batchinfer.config import scrub

    print(scrub(" ".join(line.split())), file=sys.stderr)  # always one line, whatever a library put in it


if __name__ == "__main__":
    entry()
