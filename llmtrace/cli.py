"""The ``llmtrace`` command: reports, trace listing, import and export, a health check, migrations and a demo.

Conventions, as alembic's and the ClickHouse client's: ``--url`` on every command (else
``LLMTRACE_DATABASE_URL``, else the embedded engine), ``--help`` everywhere, machine-readable output on stdout
(``--format json|csv``) with progress bars and notes on stderr. Exit codes: 0 when all went well, 1 when
llmtrace reports an error (one line on stderr, no traceback) or ``doctor`` finds a FAIL, 2 for a command line
that cannot be understood.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.json import JSON
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from llmtrace import doctor as health
from llmtrace import trace_files, usage_chart, usage_report
from llmtrace.engine import ENV_VAR, get_engine, redacted, resolve_url
from llmtrace.errors import ConfigurationError, InvalidCursor, LLMTraceError, TraceValidationError
from llmtrace.filters import ALL_ORGANIZATIONS, EQUALITY_FILTERS, FLAG_FILTERS, OrganizationScope
from llmtrace.ingest import validate_traces
from llmtrace.migrations import upgrade
from llmtrace.model import EARLIEST_CREATED_AT, EPOCH, LATEST_CREATED_AT, LLMTrace, as_utc, epoch_micros
from llmtrace.prices import (
    EARLIEST,
    ModelPrice,
    list_prices,
    load_default_prices,
    price_unpriced_models,
    set_price,
)
from llmtrace.repository import MAX_PAGE_SIZE, TraceRepository
from llmtrace.retention import Retention, get_retention, set_retention
from llmtrace.synthetic import synthetic_traces
from llmtrace.topology import configured
from llmtrace.usage import GROUP_KEYS, UsageRow

ItemT = TypeVar("ItemT")

app = typer.Typer(
    name="llmtrace",
    help="LLM traces in ClickHouse: usage reports, traces, import and export, health checks, migrations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class OutputFormat(enum.StrEnum):
    """How a report is printed."""

    TABLE = "table"
    CSV = "csv"
    JSON = "json"


class ListFormat(enum.StrEnum):
    """How traces are printed."""

    TABLE = "table"
    JSON = "json"


class FileFormat(enum.StrEnum):
    """The formats of trace files."""

    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class Granularity(enum.StrEnum):
    """The time buckets of a report (UTC)."""

    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class Percentiles(enum.StrEnum):
    """How latency percentiles are computed."""

    EXACT = "exact"
    APPROXIMATE = "approximate"
    NONE = "none"


URL_HELP = f"Database URL [default: ${ENV_VAR}, else the embedded engine in ./.llmtrace/chdb]."
Url = Annotated[str | None, typer.Option("--url", help=URL_HELP, show_default=False)]
Organization = Annotated[str | None, typer.Option("--org", help="The organization whose traces to use.")]
AllOrganizations = Annotated[
    bool, typer.Option("--all-organizations", help="Every organization (the operator's view); never the default.")
]
Since = Annotated[
    str | None,
    typer.Option(help="Only traces created at or after: a duration back from now (30m, 12h, 7d, 2w) or an ISO date."),
]
Until = Annotated[str | None, typer.Option(help="Only traces created before: a duration back from now or an ISO date.")]
Where = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        metavar="KEY=VALUE",
        help=f"Only traces whose KEY equals VALUE (repeatable). Keys: {', '.join(EQUALITY_FILTERS)}.",
    ),
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# -- helpers shared by the commands ---------------------------------------------------------------------------


def parse_moment(value: str, *, option: str, now: datetime | None = None) -> datetime:
    """A point in time from ``7d`` (that long before now) or an ISO 8601 date or datetime (naive means UTC).

    Raises:
        typer.BadParameter: Neither form.
    """
    duration = _DURATION.match(value)
    if duration:
        amount, unit = duration.groups()
        try:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: float(amount)})
        except OverflowError:
            return datetime.min.replace(tzinfo=UTC)  # further back than a datetime reaches
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (30m, 12h, 7d, 2w) nor an ISO date (2026-11-01, 2026-11-01T12:00Z)",
            param_hint=option,
        ) from None


def time_range(
    since: str | None, until: str | None, *, now: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    """``--since`` and ``--until`` as datetimes, durations measured from one "now" (default: the current time)."""
    now = now or datetime.now(UTC)
    start = parse_moment(since, option="'--since'", now=now) if since is not None else None
    end = parse_moment(until, option="'--until'", now=now) if until is not None else None
    # Bounds beyond what created_at can hold (its column's range) are bounds on nothing: left out, so that the
    # database is never asked about a moment it cannot represent.
    if start is not None and start < EARLIEST_CREATED_AT:
        start = None
    if end is not None and end > LATEST_CREATED_AT:
        end = None
    if end is not None and end < EARLIEST_CREATED_AT:
        end = EARLIEST_CREATED_AT  # before every trace, as asked
    if start is not None and end is not None and start >= end:
        raise typer.BadParameter(f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})")
    return start, end


def is_relative(*moments: str | None) -> bool:
    """Whether any of these ``--since``/``--until`` values is a duration back from now (not an ISO date)."""
    return any(moment is not None and _DURATION.match(moment) for moment in moments)


def split_cursor(cursor: str | None) -> tuple[str | None, datetime | None]:
    """A cursor ``traces`` printed: the repository's, and the instant its relative times were measured from, if any.

    ``--since 7d`` means another instant at every run, and a cursor belongs to the filters of the page that issued
    it; so when the times are relative, the printed cursor carries the first page's "now" after a ``.`` (which a
    repository cursor, base64url, never holds), and the next pages measure from it.
    """
    if cursor is None or "." not in cursor:
        return cursor, None
    page, _, micros = cursor.rpartition(".")
    try:
        return page, EPOCH + timedelta(microseconds=int(micros))
    except (ValueError, OverflowError):
        raise InvalidCursor("Malformed cursor: pass back exactly the next_cursor of a previous page.") from None


def parse_where(conditions: Sequence[str] | None) -> dict[str, Any]:
    """``--where KEY=VALUE`` options as the repository's filter keywords (flags as booleans)."""
    filters: dict[str, Any] = {}
    for condition in conditions or ():
        key, sign, value = condition.partition("=")
        key = key.strip()
        if not sign or key not in EQUALITY_FILTERS:
            raise typer.BadParameter(
                f"{condition!r}: expected KEY=VALUE with KEY one of {', '.join(EQUALITY_FILTERS)}",
                param_hint="'--where'",
            )
        if key in filters:
            raise typer.BadParameter(f"{key} is given twice", param_hint="'--where'")
        if key in FLAG_FILTERS:
            flag = value.strip().lower()
            if flag not in ("true", "false", "1", "0"):
                raise typer.BadParameter(f"{key} takes true or false, got {value!r}", param_hint="'--where'")
            filters[key] = flag in ("true", "1")
        else:
            filters[key] = value
    return filters


def organization_scope(organization: str | None, all_organizations: bool) -> OrganizationScope:
    """``--org`` or ``--all-organizations``: exactly one of them, never all organizations by default."""
    if all_organizations and organization is not None:
        raise typer.BadParameter("give --org or --all-organizations, not both", param_hint="'--org'")
    if all_organizations:
        return ALL_ORGANIZATIONS
    if organization is None or not organization.strip():
        raise typer.BadParameter(
            "name the organization with --org ORG, or ask for every organization with --all-organizations",
            param_hint="'--org'",
        )
    return organization


def database_url(context: typer.Context, url: str | None) -> str | None:
    """The command's ``--url``, else the one given before the command (``llmtrace --url ... usage``)."""
    given: str | None = context.obj
    return url if url is not None else given


def stdout_console() -> Console:
    # Not a terminal (a pipe, a file): tables keep their natural width instead of being squeezed into 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def progress_bar(*, in_bytes: bool = False) -> Progress:
    """A progress bar on stderr, so that stdout carries only the command's output.

    Shown only where someone watches: not when stderr is a file or a pipe (a log), unless TTY_INTERACTIVE=1.
    """
    console = stderr_console()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn() if in_bytes else MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_interactive,
    )


class Terminated(BaseException):  # a signal, like KeyboardInterrupt: not an Exception for handlers to catch
    """A termination signal arrived; raised so that what the command was doing is cleaned up on the way out."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


# Signals that end a command at someone's request: kill, timeout, systemd (SIGTERM); a closed terminal (SIGHUP).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` rather than end the process at once.

    Only signals left at their default action are taken over (``nohup`` ignores SIGHUP, and so does this), and only
    in the main thread, where Python runs signal handlers. :func:`main` ends the process by the signal afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signal_number: int, frame: object) -> None:
        raise Terminated(signal_number)

    taken = {number: signal.signal(number, terminate) for number in TERMINATING_SIGNALS
             if signal.getsignal(number) is signal.SIG_DFL}  # fmt: skip
    try:
        yield
    finally:
        for number, previous in taken.items():
            signal.signal(number, previous)


@contextmanager
def binary_output(path: str) -> Iterator[BinaryIO]:
    """Standard output for ``-``; else a temporary file next to ``path``, renamed to it only when all went well."""
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    # Named before it is created, so that a signal arriving the moment it is created still finds it to remove.
    temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    with signals_raise():
        try:
            handle = open(temporary, "xb", opener=_owner_only)  # noqa: SIM115 (closed, renamed or removed below)
        except FileExistsError as exc:  # another file by that name, which is not ours to remove
            raise ConfigurationError(f"Cannot write {path}: {temporary} exists; try again.") from exc
        except OSError as exc:
            raise ConfigurationError(f"Cannot write {path}: {exc.strerror}.") from exc
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        try:
            with handle:
                yield handle
            os.replace(temporary, target)
        except BaseException as exc:
            temporary.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise ConfigurationError(f"Cannot write {path}: {exc.strerror or exc}; nothing was written.") from exc
            raise


def _owner_only(path: str, flags: int) -> int:
    """Open a new file readable and writable by its owner only: an export holds payloads."""
    return os.open(path, flags, 0o600)


# -- the commands ---------------------------------------------------------------------------------------------


@app.callback()
def main_options(context: typer.Context, url: Url = None) -> None:
    """LLM traces in ClickHouse: usage reports, traces, import and export, health checks, migrations."""
    context.obj = url


@app.command()
def usage(
    context: typer.Context,
    org: Organization = None,
    all_organizations: AllOrganizations = False,
    by: Annotated[
        str,
        typer.Option(help=f"Group keys, comma-separated ('' for one total). Any of: {', '.join(GROUP_KEYS)}."),
    ] = "model",
    since: Since = None,
    until: Until = None,
    granularity: Annotated[
        Granularity | None, typer.Option(help="Add a UTC time bucket per hour, day or month.")
    ] = None,
    where: Where = None,
    percentiles: Annotated[
        Percentiles,
        typer.Option(
            help="Exact latency percentiles, approximate ones in bounded memory, or none (the fastest reports)."
        ),
    ] = Percentiles.EXACT,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="How to print the report.")] = (
        OutputFormat.TABLE
    ),
    chart: Annotated[
        Path | None,
        typer.Option(
            help="Also write a chart of tokens (and cost) over time by the first group key to this .png or .svg file.",
            dir_okay=False,
        ),
    ] = None,
    url: Url = None,
) -> None:
    """Usage (and cost) report: requests, tokens, bytes and latency per group and time bucket."""
    scope = organization_scope(org, all_organizations)
    keys = tuple(key.strip() for key in by.split(",") if key.strip())
    unknown = [key for key in keys if key not in GROUP_KEYS]
    if unknown or len(set(keys)) != len(keys):
        problem = f"unknown key(s) {', '.join(unknown)}" if unknown else "a key is repeated"
        raise typer.BadParameter(f"{problem}; use any of {', '.join(GROUP_KEYS)}", param_hint="'--by'")
    if chart is not None and chart.suffix.lower() not in usage_chart.FORMATS:
        raise typer.BadParameter(f"{chart}: a chart file's name ends in .png or .svg", param_hint="'--chart'")
    if chart is not None and not chart.resolve().parent.is_dir():
        raise typer.BadParameter(
            f"{chart}: no directory {chart.resolve().parent} to write it in", param_hint="'--chart'"
        )
    start, end = time_range(since, until)
    filters = parse_where(where)
    repository = TraceRepository(get_engine(database_url(context, url)))

    def report(bucket: str | None) -> list[UsageRow]:
        return repository.usage(
            scope,
            group_by=keys,
            since=start,
            until=end,
            granularity=bucket,
            percentiles=None if percentiles is Percentiles.NONE else percentiles.value,
            **filters,
        )

    chosen = granularity.value if granularity is not None else None
    rows = report(chosen)
    title = usage_title(scope, keys, chosen, start, end, filters)
    if output_format is OutputFormat.JSON:
        usage_report.write_json(rows, keys, sys.stdout)
    elif output_format is OutputFormat.CSV:
        usage_report.write_csv(rows, keys, sys.stdout)
    else:
        console = stdout_console()
        console.print(Text(title if rows else f"{title}: no traces.", style="bold"))
        if rows:
            rendered = usage_report.table(rows, keys, granularity=chosen)
            console.print(rendered)
            wanted = console.measure(rendered).maximum
            if wanted > console.width:
                advice = (
                    f"The table needs {wanted} columns, the terminal has {console.width}: widen it, or use --format csv"
                )
                stderr_console().print(Text(advice, style="dim"))
            left_out = usage_report.unreported(rows)
            if left_out:
                console.print(Text(f"Not reported by any trace: {', '.join(left_out)}.", style="dim"))
    if chart is not None:
        chart_granularity = chosen or chart_bucket(start, end)
        chart_rows = rows if chosen is not None else report(chart_granularity)
        usage_chart.write_chart(
            chart_rows, chart, key=keys[0] if keys else None, granularity=chart_granularity, title=title
        )
        where_to = sys.stdout if output_format is OutputFormat.TABLE else sys.stderr
        print(f"Chart written to {chart.resolve()}", file=where_to)


def usage_title(
    scope: OrganizationScope,
    keys: Sequence[str],
    granularity: str | None,
    start: datetime | None,
    end: datetime | None,
    filters: dict[str, Any],
) -> str:
    """A report's title, saying what it covers: "Usage of org-1 by model per day, since 2026-11-21 10:00 UTC"."""
    whose = "all organizations" if scope is ALL_ORGANIZATIONS else str(scope)
    parts = [f"Usage of {whose}"]
    if keys:
        parts.append(f"by {', '.join(keys)}")
    if granularity:
        parts.append(f"per {granularity}")
    title = " ".join(parts)
    if start is not None:
        title += f", since {start:%Y-%m-%d %H:%M} UTC"
    if end is not None:
        title += f", until {end:%Y-%m-%d %H:%M} UTC"
    if filters:
        title += ", where " + ", ".join(f"{key}={value}" for key, value in filters.items())
    return title


def chart_bucket(start: datetime | None, end: datetime | None) -> str:
    """The granularity of a chart over ``start``..``end`` when none was asked for: about 24 to 120 bars."""
    if start is None:
        return Granularity.DAY.value
    span = (end or datetime.now(UTC)) - start
    if span <= timedelta(days=3):
        return Granularity.HOUR.value
    if span <= timedelta(days=120):
        return Granularity.DAY.value
    return Granularity.MONTH.value


@app.command()
def traces(
    context: typer.Context,
    org: Annotated[str, typer.Option("--org", help="The organization whose traces to list.")],
    where: Where = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE_SIZE, help="Traces per page.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Start after the page that printed this cursor.")] = None,
    show: Annotated[
        str | None, typer.Option(help="Print this one trace (by its id), its JSON payloads pretty-printed.")
    ] = None,
    output_format: Annotated[ListFormat, typer.Option("--format", help="How to print the traces.")] = ListFormat.TABLE,
    url: Url = None,
) -> None:
    """List an organization's traces, newest first, a page at a time; or show one with --show ID."""
    scope = organization_scope(org, False)
    assert isinstance(scope, str)
    page_cursor, measured_from = split_cursor(cursor)
    now = measured_from or datetime.now(UTC)
    start, end = time_range(since, until, now=now)
    filters = parse_where(where)
    repository = TraceRepository(get_engine(database_url(context, url)))
    if show is not None:
        trace = repository.get(scope, show)
        if output_format is ListFormat.JSON:
            print(trace.model_dump_json(indent=2))
        else:
            print_trace(stdout_console(), trace)
        return
    page = repository.list(scope, since=start, until=end, limit=limit, cursor=page_cursor, **filters)
    next_cursor = page.next_cursor
    if next_cursor is not None and is_relative(since, until):
        next_cursor += f".{epoch_micros(now)}"
    if output_format is ListFormat.JSON:
        items = [trace.model_dump(mode="json") for trace in page.items]
        json.dump({"traces": items, "next_cursor": next_cursor}, sys.stdout, ensure_ascii=False, indent=2)
        print()
        return
    console = stdout_console()
    console.print(Text(f"Traces of {scope}, newest first", style="bold"))
    console.print(traces_table(page.items))
    if next_cursor is not None:
        console.print(Text(f"Next page: --cursor {next_cursor}"))


def traces_table(items: Sequence[LLMTrace]) -> Table:
    """One line per trace: when, which, who, what it cost in tokens and time, and whether it failed."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for name in ("created at (UTC)", "id", "agent", "model", "call type"):
        table.add_column(name)
    for name in ("prompt tok", "compl. tok", "total tok", "latency ms"):
        table.add_column(name, justify="right")
    table.add_column("error")
    for trace in items:
        table.add_row(
            f"{trace.created_at:%Y-%m-%d %H:%M:%S.%f}",
            trace.id,
            trace.agent_id or "-",
            trace.model,
            trace.call_type,
            f"{trace.prompt_tokens:,}",
            f"{trace.completion_tokens:,}",
            f"{trace.total_tokens:,}",
            f"{trace.latency_ms:,}",
            Text(trace.error_type or "error", style="red") if trace.is_error else "",
        )
    return table


PAYLOADS = ("request_json", "response_json", "llm_config_json")


def print_trace(console: Console, trace: LLMTrace) -> None:
    """Every field of ``trace``, then its payloads, pretty-printed when they are JSON."""
    fields = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for name, value in trace.model_dump().items():
        if name not in PAYLOADS:
            shown = json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value)
            fields.add_row(name, Text("-" if value is None else shown))
    console.print(fields)
    for name in PAYLOADS:
        payload: str = getattr(trace, name)
        console.print(Text(f"\n{name} ({len(payload.encode()):,} bytes)", style="bold"))
        try:
            console.print(JSON(payload))
        except (json.JSONDecodeError, RecursionError):  # not JSON, or nested deeper than the parser goes
            console.print(Text(payload))


@app.command("import")
def import_traces(
    context: typer.Context,
    file: Annotated[str, typer.Argument(help="A .jsonl, .csv or .parquet file of traces; - for standard input.")],
    file_format: Annotated[
        FileFormat | None, typer.Option("--format", help="The file's format [default: from its name; - is jsonl].")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Traces per batch: each is validated, then written whole.")] = (
        5_000
    ),
    url: Url = None,
) -> None:
    """Load traces from a file, exactly once: importing the same file again stores nothing twice.

    Each batch is validated before any of it is written. A batch with bad lines is not written at all: the
    command lists them (line or row number, field, problem) and stops; fix them and run it again.
    """
    name = trace_files.file_format(file, file_format.value if file_format is not None else None)
    repository = TraceRepository(get_engine(database_url(context, url)))
    with open_input(file) as stream:
        counter = trace_files.ByteCounter(stream)
        if name == "parquet":
            total = trace_files.parquet_rows(stream)
            items = trace_files.read_items(stream, name)
        else:
            total = _size_of(stream)
            items = trace_files.read_items(io.BufferedReader(counter), name)
        read = stored = 0
        position = trace_files.position_name(name)
        with progress_bar(in_bytes=name != "parquet") as progress:
            task = progress.add_task(f"importing {file}", total=total)
            try:
                for batch in chunks(items, batch_size):
                    numbers, traces_of_batch = validated_batch(batch, position=position, file=file, stored=stored)
                    try:
                        stored += repository.add_many(traces_of_batch, batch_size=batch_size)
                    except TraceValidationError as exc:
                        # What only the database can tell (a trace past the table's retention), by line as well.
                        problems = [(numbers[index], field, message) for index, field, message in exc.problems]
                        raise rejected_batch(batch, problems, position=position, file=file, stored=stored) from None
                    read += len(batch)
                    progress.update(task, completed=read if name == "parquet" else counter.count)
            except ImportRejectedError:
                raise  # says what earlier batches stored
            except LLMTraceError as exc:
                # The database failed, or the file turned out to be damaged part-way.
                if read:
                    exc.add_note(
                        f"{stored:,} trace(s) of earlier batches of {file} were stored; importing it again skips them."
                    )
                raise
    skipped = read - stored
    print(
        f"Imported {stored:,} trace(s) from {file}"
        + (f"; {skipped:,} skipped (already stored, or repeated in the file)." if skipped else ".")
    )


def _size_of(stream: BinaryIO) -> int | None:
    try:
        return os.fstat(stream.fileno()).st_size or None
    except (OSError, ValueError):
        return None


@contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """Standard input's bytes for ``-``, else the file."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ConfigurationError(f"Cannot read {path}: {exc.strerror}.") from exc
    with handle:
        yield handle


class ImportRejectedError(LLMTraceError):
    """A batch of an import had lines that are not valid traces; nothing of it was written."""


MAX_PROBLEMS_SHOWN = 50


def validated_batch(
    batch: Sequence[tuple[int, trace_files.Item]], *, position: str, file: str, stored: int
) -> tuple[list[int], list[LLMTrace]]:
    """The line (or row) numbers and traces of one batch of a file.

    Raises:
        ImportRejectedError: Listing every problem of the batch by line and field.
    """
    problems = [
        (number, item.field, item.message) for number, item in batch if isinstance(item, trace_files.Unreadable)
    ]
    readable = [(number, item) for number, item in batch if not isinstance(item, trace_files.Unreadable)]
    traces: list[LLMTrace] = []
    try:
        traces = validate_traces([item for _, item in readable], start=0)
    except TraceValidationError as exc:
        problems += [(readable[index][0], field, message) for index, field, message in exc.problems]
    if problems:
        raise rejected_batch(batch, problems, position=position, file=file, stored=stored)
    return [number for number, _ in readable], traces


def rejected_batch(
    batch: Sequence[tuple[int, trace_files.Item]],
    problems: list[tuple[int, str, str]],
    *,
    position: str,
    file: str,
    stored: int,
) -> ImportRejectedError:
    """The error that stops an import at a batch with problems, each given as (line or row number, field, problem)."""
    problems = sorted(problems)
    first, last = batch[0][0], batch[-1][0]
    lines = [f"  {position} {number}, {field}: {message}" for number, field, message in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    return ImportRejectedError(
        f"{file}: {len(problems)} problem(s) in {position}s {first} to {last}; nothing of that batch was written"
        f" ({stored:,} trace(s) of earlier batches were stored; importing the file again skips them):\n"
        + "\n".join(lines)
    )


@app.command()
def export(
    context: typer.Context,
    org: Organization = None,
    all_organizations: AllOrganizations = False,
    where: Where = None,
    since: Since = None,
    until: Until = None,
    output: Annotated[str, typer.Option("--output", "-o", help="The file to write; - for standard output.")] = "-",
    file_format: Annotated[
        FileFormat | None, typer.Option("--format", help="The file's format [default: from its name; - is jsonl].")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_PAGE_SIZE, help="Traces read and written at a time (bounds memory).")
    ] = 1_000,
    url: Url = None,
) -> None:
    """Write traces to a JSON Lines, CSV or Parquet file, newest first, a page at a time.

    The file is written under a temporary name and renamed when complete: a failed export leaves no partial file.
    """
    scope = organization_scope(org, all_organizations)
    start, end = time_range(since, until)
    filters = parse_where(where)
    name = trace_files.file_format(output, file_format.value if file_format is not None else None)
    repository = TraceRepository(get_engine(database_url(context, url)))
    if scope is ALL_ORGANIZATIONS:
        organizations = repository.organizations(since=start, until=end, **filters)
        nameless = sum(count for organization, count in organizations if not organization.strip())
        if nameless:
            # An export reads one organization at a time, and these name none (another writer stored them so).
            stderr_console().print(
                Text(f"Not exported: {nameless:,} trace(s) without an organization id (stored as '').")
            )
        organizations = [(organization, count) for organization, count in organizations if organization.strip()]
    else:
        assert isinstance(scope, str)
        organizations = [(scope, repository.count(scope, since=start, until=end, **filters))]
    written = 0
    with binary_output(output) as out, progress_bar() as progress:
        writer = trace_files.open_writer(out, name)
        task = progress.add_task(f"exporting to {output}", total=sum(count for _, count in organizations))
        for organization, _ in organizations:
            for page in pages(repository, organization, filters, start, end, batch_size):
                writer.write(page)
                written += len(page)
                progress.update(task, completed=written)
        writer.close()
    stderr_console().print(Text(f"Exported {written:,} trace(s)" + ("" if output == "-" else f" to {output}") + "."))


def pages(
    repository: TraceRepository,
    organization: str,
    filters: dict[str, Any],
    since: datetime | None,
    until: datetime | None,
    size: int,
) -> Iterator[list[LLMTrace]]:
    """An organization's traces, newest first, one page at a time (keyset pagination: memory holds one page)."""
    cursor = None
    while True:
        page = repository.list(organization, since=since, until=until, limit=size, cursor=cursor, **filters)
        if page.items:
            yield page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


@app.command()
def doctor(
    context: typer.Context,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Also check this TraceWriter spool directory's backlog.", file_okay=False)
    ] = None,
    url: Url = None,
) -> None:
    """Check the database and a spool directory: each line OK, WARN or FAIL with what to do; exit 1 on a FAIL."""
    console = stdout_console()
    checks = []
    styles = {health.Status.OK: "green", health.Status.WARN: "yellow", health.Status.FAIL: "bold red"}
    for check in health.diagnose(database_url(context, url), spool_dir=spool_dir):
        checks.append(check)
        line = Text()
        line.append(f"{check.status.value:<5}", style=styles[check.status])
        line.append(f"{check.name:<11}{check.found}")
        console.print(line, overflow="fold")
        if check.advice:
            console.print(Text(f"{'':<16}-> {check.advice}"), overflow="fold")
    if health.report_status(checks) is health.Status.FAIL:
        raise typer.Exit(1)


@app.command()
def migrate(
    context: typer.Context,
    topology: Annotated[
        str | None,
        typer.Option(help="single, cluster:<name>, replicated or cloud [default: $LLMTRACE_TOPOLOGY, else detected]."),
    ] = None,
    url: Url = None,
) -> None:
    """Upgrade the schema to the newest revision (alembic upgrade head, without alembic.ini)."""
    chosen = configured(topology, source="--topology")
    engine = get_engine(database_url(context, url))
    upgrade(engine, topology=chosen)
    print(f"Schema is at the newest revision{f' ({chosen} topology)' if chosen else ''}.")


@app.command()
def retention(
    context: typer.Context,
    rows_days: Annotated[
        str | None, typer.Option(metavar="DAYS|none", help="Days after which traces are dropped.")
    ] = None,
    payload_days: Annotated[
        str | None, typer.Option(metavar="DAYS|none", help="Days after which payloads are emptied.")
    ] = None,
    materialize: Annotated[
        bool, typer.Option(help="Apply the change to parts written before it (background merges do the work).")
    ] = True,
    topology: Annotated[
        str | None, typer.Option(help="As for migrate [default: $LLMTRACE_TOPOLOGY, else detected].")
    ] = None,
    url: Url = None,
) -> None:
    """Show how long traces and their payloads are kept, or set it by giving both options ("none": no limit)."""
    if rows_days is None and payload_days is None:
        print(describe_retention(get_retention(get_engine(database_url(context, url)), topology=topology)))
        return
    if rows_days is None or payload_days is None:
        raise ConfigurationError(
            "give both --rows-days and --payload-days (a number of days, or none to keep data for as long as the "
            "table exists), or neither to show the retention"
        )
    try:
        wanted = Retention(days_or_none("--rows-days", rows_days), days_or_none("--payload-days", payload_days))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from exc  # checked before the database is opened
    applied = set_retention(
        get_engine(database_url(context, url)),
        rows_days=wanted.rows_days,
        payload_days=wanted.payload_days,
        topology=topology,
        materialize=materialize,
    )
    print(describe_retention(applied))


def describe_retention(retention: Retention) -> str:
    rows = "kept" if retention.rows_days is None else f"dropped after {retention.rows_days} days"
    payloads = "kept" if retention.payload_days is None else f"emptied after {retention.payload_days} days"
    return f"Traces: {rows}; payloads: {payloads}."


def days_or_none(option: str, value: str) -> int | None:
    """A whole number of days, or ``None`` for ``none``."""
    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{option} takes a whole number of days or none, got {value!r}") from None


@app.command()
def demo(
    context: typer.Context,
    count: Annotated[int, typer.Option("--traces", min=1, help="How many traces to generate.")] = 100_000,
    seed: Annotated[int | None, typer.Option(help="Random seed [default: a fresh one].")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Traces per add_many batch.")] = 10_000,
    url: Url = None,
) -> None:
    """Migrate, then write generated traces of the last 24 hours (three organizations) through add_many."""
    chosen_url = database_url(context, url)
    engine = get_engine(chosen_url)
    print(f"Database: {redacted(resolve_url(chosen_url))}")
    started = time.perf_counter()
    upgrade(engine)
    timings = {"migrate (alembic upgrade head)": time.perf_counter() - started}
    repository = TraceRepository(engine)
    generated = TimedSource(synthetic_traces(count, organizations=3, agents_per_organization=4, seed=seed))
    written = 0
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("writing traces", total=count)
        for batch in chunks(generated, batch_size):
            written += repository.add_many(batch, batch_size=batch_size)
            progress.update(task, advance=len(batch))
    # Traces are generated while they are written; the two are reported apart.
    timings[f"generate {count:,} synthetic traces"] = generated.seconds
    writing = timings[f"write {count:,} traces (add_many)"] = time.perf_counter() - started - generated.seconds
    print(f"Wrote {written:,} traces ({written / writing:,.0f} traces/s, not counting their generation).")
    print("Time per step:")
    for step, seconds in timings.items():
        print(f"  {step:<36} {seconds:8.2f} s")
    print("Next: llmtrace usage --all-organizations --since 1d --by model")


class TimedSource(Iterator[ItemT]):
    """Passes items on and adds up the time spent producing them."""

    def __init__(self, items: Iterable[ItemT]) -> None:
        self._items = iter(items)
        self.seconds = 0.0

    def __next__(self) -> ItemT:
        started = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.seconds += time.perf_counter() - started


def chunks(items: Iterable[ItemT], size: int) -> Iterator[list[ItemT]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    chunk: list[ItemT] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


prices_app = typer.Typer(
    help="The price list reports are priced from: list it, set your own prices, add prices for unpriced models.",
    no_args_is_help=True,
)
app.add_typer(prices_app, name="prices")


@prices_app.command("list")
def prices_list(
    context: typer.Context,
    provider: Annotated[str | None, typer.Option(help="Only this provider (as traces name it).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model (as traces name it).")] = None,
    source: Annotated[str | None, typer.Option(help="Only 'user' (your prices) or 'genai-prices'.")] = None,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="table or json (csv prints the table).")
    ] = OutputFormat.TABLE,
    url: Url = None,
) -> None:
    """The prices in force, per provider, model and start; rates in USD per million tokens (base tier)."""
    found = list_prices(get_engine(database_url(context, url)), provider=provider, model=model, source=source)
    if output is OutputFormat.JSON:
        print(json.dumps([_price_record(price) for price in found], indent=2))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for header in ("provider", "model", "from (UTC)", "source", "input", "cached", "cache write", "output", "tiers"):
        table.add_column(header)
    for price in found:
        base = price.tiers[0]
        table.add_row(
            price.provider,
            price.model,
            price.effective_from.strftime("%Y-%m-%d %H:%M"),
            price.source,
            *(f"{value.normalize():f}" for value in (base.input, base.cached_input, base.cache_write, base.output)),
            str(len(price.tiers) - 1) if len(price.tiers) > 1 else "",
        )
    stdout_console().print(table)


def _price_record(price: ModelPrice) -> dict[str, Any]:
    return {
        "provider": price.provider,
        "model": price.model,
        "effective_from": price.effective_from.isoformat(),
        "source": price.source,
        "prompt_includes_cached": price.prompt_includes_cached,
        "completion_includes_reasoning": price.completion_includes_reasoning,
        "tiers": [
            {name: (str(value) if value is not None else None) for name, value in vars(tier).items()}
            for tier in price.tiers
        ],
    }


@prices_app.command("set")
def prices_set(
    context: typer.Context,
    provider: Annotated[str, typer.Argument(help="The provider, as traces name it.")],
    model: Annotated[str, typer.Argument(help="The model, as traces name it.")],
    input_rate: Annotated[str, typer.Option("--input", help="USD per million input tokens.")],
    output_rate: Annotated[str, typer.Option("--output", help="USD per million output tokens.")],
    cached_input: Annotated[str | None, typer.Option(help="Cache reads [default: the input rate].")] = None,
    cache_write: Annotated[str | None, typer.Option(help="Cache writes [default: the input rate].")] = None,
    reasoning: Annotated[str | None, typer.Option(help="Reasoning tokens [default: the output rate].")] = None,
    effective_from: Annotated[
        str | None, typer.Option("--from", help="A whole UTC hour, ISO format [default: the start of time].")
    ] = None,
    url: Url = None,
) -> None:
    """Set your own price for a model (it wins over the default list from its start on); reports re-price at once."""
    try:
        start = as_utc(datetime.fromisoformat(effective_from)) if effective_from else EARLIEST
        price = ModelPrice.flat(
            provider,
            model,
            input=_rate("--input", input_rate) or Decimal(0),
            output=_rate("--output", output_rate) or Decimal(0),
            cached_input=_rate("--cached-input", cached_input),
            cache_write=_rate("--cache-write", cache_write),
            reasoning=_rate("--reasoning", reasoning),
            effective_from=start,
        )
    except ValueError as exc:
        raise ConfigurationError(f"invalid price: {exc}") from exc
    set_price(get_engine(database_url(context, url)), price)
    print(f"{provider} {model}: {input_rate} in / {output_rate} out per million tokens from {start.isoformat()}.")


def _rate(option: str, value: str | None) -> Decimal | None:
    """A rate given on the command line, as an exact Decimal."""
    if value is None:
        return None
    try:
        return Decimal(value)
    except ArithmeticError:  # decimal.InvalidOperation
        raise ValueError(f"{option} takes a number of USD per million tokens, got {value!r}") from None


@prices_app.command("sync")
def prices_sync(context: typer.Context, url: Url = None) -> None:
    """Add genai-prices' prices for the model names traces use that have no price yet (dated variants, aliases)."""
    report = price_unpriced_models(get_engine(database_url(context, url)))
    for provider, model in report.priced:
        print(f"priced: {provider} {model}")
    for provider, model in report.still_unpriced:
        print(f"no price known: {provider} {model} -> set one with `llmtrace prices set`")
    if not report.priced and not report.still_unpriced:
        print("Every model the traces name has a price.")


@prices_app.command("refresh")
def prices_refresh(context: typer.Context, url: Url = None) -> None:
    """Bring the default list up to the installed genai-prices (your own prices are left alone)."""
    count = load_default_prices(get_engine(database_url(context, url)))
    print(f"The default list holds {count:,} prices.")


def _quiet_driver_log() -> None:
    """Keep clickhouse-connect's log records off stderr: the error they precede is reported as llmtrace's one line.

    The driver logs a failed request ("Unexpected Http Driver Exception") before raising it; with no logging set
    up, Python's last-resort handler would print that above the command's own message.
    """
    driver = logging.getLogger("clickhouse_connect")
    if not any(isinstance(handler, logging.NullHandler) for handler in driver.handlers):
        driver.addHandler(logging.NullHandler())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code; llmtrace's own errors become one line on stderr and 1.

    Args:
        argv: The arguments after the program's name (default: ``sys.argv[1:]``).
    """
    _quiet_driver_log()
    try:
        app(args=list(argv) if argv is not None else None, prog_name="llmtrace")
    except SystemExit as exit_:
        # Typer (Click) ends every run this way: 0 when done, 2 for a wrong command line, or the command's code.
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    except LLMTraceError as exc:
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
        print(f"llmtrace: {exc}{notes}", file=sys.stderr)
        return 1
    except Terminated as stop:
        # Cleaned up on the way here; now end as the signal would have, so that the parent sees which one it was.
        signal.signal(stop.signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signal_number)
        return 128 + stop.signal_number
    except BrokenPipeError:
        # The reader went away (`llmtrace export | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
