"""The exactly-once write path behind :meth:`TraceRepository.add_many`, in the order it runs.

1. **Validate.** Mappings become :class:`LLMTrace` objects; every problem of a batch is collected before
   anything of it is written. Traces already past the table's row retention (:mod:`llmtrace.retention`) are
   refused too: ClickHouse would store them and drop them at its next merge, within milliseconds, so the count of
   step 5 could confirm rows that are gone a moment later, or find them gone and send them again.
2. **Columns.** The batch is transposed into column data; repeats of an identity ``(organization_id, id)``
   within it are dropped (the first wins). The batch's first deduplication token is derived from the
   identities now, before the lookup.
3. **Look up** (``skip_stored``): traces whose copy is already stored (same sort key and id) are dropped, so
   overlapping batches store each trace once (:mod:`llmtrace.stored_lookup`).
4. **Insert** under that token, squashed into one block per partition, with the insert's ``log_comment`` set
   to a fresh attempt id that the hidden ``insert_attempt`` column records on every row.
5. **Count** the rows of this attempt. That is the number returned. Fewer rows than were sent means
   ClickHouse dropped blocks as repeats of a token it remembers: the traces of those blocks whose copy is
   still stored are done; any whose copy was deleted, dropped or truncated since are inserted again under the
   next token of a sequence (step 4 again), until every trace sent is stored.

Why a batch is stored exactly once (the README states this argument):

- ClickHouse stores at most one block per partition and token within its deduplication window (the last
  10,000 blocks, one per partition an insert touches). Every attempt of a batch, in this process or another,
  sends the same first token, because the token names the batch as the caller sent it, not what the lookup
  left of it; and every insert is squashed into one block per partition, so two attempts' blocks of a
  partition meet under that token and only one is stored. An attempt whose lookup runs while another is
  landing skips the partitions already committed (each is committed whole) and meets the other in the rest.
- The count of step 5 reads what this attempt itself stored (its own attempt id), so the return value never
  counts rows another attempt stored, and deduplicated rows are never reported as written.
- A trace is never silently lost to a token remembered from a copy that no longer exists: step 5 sees the
  shortfall, and the next round's token is new to ClickHouse unless a concurrent attempt of the batch sent it
  too, in which case one of them stores it and the other finds it stored.
- On a cluster (:mod:`llmtrace.topology`) the insert goes through the Distributed table, synchronously, and
  ClickHouse deduplicates per shard: each shard stores at most one block per partition and token. The sharding
  key is a function of each trace's identity, so every attempt sends a trace to the same shard, where its
  attempts' blocks meet as above. Each shard computes ``insert_attempt`` from the ``log_comment`` the insert
  forwards to it, and step 5 and the lookup read every shard (the lookup ships the keys with ``GLOBAL IN``), from
  the replicas the insert wrote to (see :meth:`llmtrace.topology.Topology.read_settings`). The replicated
  engines also forget a block's token after ``replicated_deduplication_window_seconds`` (7 days here).
- Not covered: two overlapping but different batches written at the same moment can both pass the lookup
  and store the traces they share twice; a trace re-sent with the same id but another ``agent_id`` or
  ``created_at`` is a different trace to the lookup; with ``skip_stored=False``, a retry that comes after more
  than the window's 10,000 blocks is stored again; a delete of the same traces that runs while ``add_many``
  writes them may land before or after them (both are orders the two calls could have run in); a retention
  shortened (:func:`llmtrace.set_retention`) while ``add_many`` runs applies to its next call, so traces it
  stores meanwhile may be dropped at the next merge after being counted.
"""

from __future__ import annotations

import hashlib
import json
import operator
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import islice
from typing import Any, TypeVar

from pydantic import ValidationError

from llmtrace.errors import (
    DatabaseError,
    SchemaNotMigratedError,
    TraceValidationError,
    WriteUnconfirmed,
    database_errors,
)
from llmtrace.model import CLICKHOUSE_COLUMNS, LLMTrace, as_utc, insert_column_data
from llmtrace.record import INSERT_ATTEMPT_COLUMN, INSERT_ATTEMPT_PREFIX, TABLE_NAME
from llmtrace.retention import read_row_retention
from llmtrace.stored_lookup import BatchKeys, Identity, StoredTraces

TraceInput = LLMTrace | Mapping[str, Any]
ORGANIZATION, ID = CLICKHOUSE_COLUMNS.index("organization_id"), CLICKHOUSE_COLUMNS.index("id")
CREATED_AT = CLICKHOUSE_COLUMNS.index("created_at")
INSERT_SETTINGS = {
    # A batch may span many months (backfills); ClickHouse's default refuses more than 100 partitions per insert.
    "max_partitions_per_insert_block": 0,
    # ClickHouse deduplicates a block per partition and token. Squashing the whole insert into one block (then
    # split by partition) makes the blocks of two attempts of a batch line up partition by partition; its default
    # limits (about a million rows, 256 MiB) or a profile without squashing would cut an insert into several
    # blocks, committed one by one, whose split follows the data sent (the cost: the server holds a batch whole).
    "min_insert_block_size_rows": 1 << 40,
    "min_insert_block_size_bytes": 1 << 50,
    # Deduplication is what makes retries safe; recent servers default to asynchronous inserts, whose errors
    # and deduplication work differently. Both are set rather than assumed.
    "insert_deduplicate": 1,
    "async_insert": 0,
    # A block ClickHouse drops as a repeat must not reach the usage rollup's materialized view either: the view's
    # blocks are deduplicated too (older servers default to 0 here).
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    # On a cluster llm_traces is a Distributed table. Its default is to queue the rows on the server that took
    # the insert and forward them later; synchronously, the insert returns once every shard stored its rows (or
    # fails), so that step 5 counts them. The name every server version accepts (distributed_foreground_insert
    # since 23.10). in_order: the replica each shard's rows go to is the one step 5 reads (see
    # Topology.read_settings). Neither changes an insert into a table that is not Distributed.
    "insert_distributed_sync": 1,
    "load_balancing": "in_order",
}
_CREATED_AT = operator.attrgetter("created_at")  # the fastest way to read a field of every trace (~0.2 µs each)
# The reads that confirm an insert are tried this many times, waiting 0.05, 0.1, 0.2, 0.4 s in between.
CONFIRM_ATTEMPTS = 5
CONFIRM_FIRST_DELAY = 0.05
# Each extra round means the batch's earlier copy was erased after being stored once more; a hundred such
# cycles of the very same batch within the deduplication window is not something a service does.
MAX_ROUNDS = 100

_HAS_ATTEMPT_COLUMN = (
    "SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = %(table)s AND name = %(column)s"
)
_ROWS_OF_ATTEMPT = (
    f"SELECT count() FROM {TABLE_NAME} WHERE {INSERT_ATTEMPT_COLUMN} = %(attempt)s "
    "AND created_at BETWEEN fromUnixTimestamp64Micro(%(earliest)s, 'UTC') "
    "AND fromUnixTimestamp64Micro(%(latest)s, 'UTC')"
)


# -- 1. validate ----------------------------------------------------------------------------------------------


def validate_traces(items: Iterable[TraceInput], *, start: int) -> list[LLMTrace]:
    """Validate every item, collecting all problems before raising.

    Args:
        items: Traces or mappings of their fields.
        start: Index of the first item within the caller's whole input, for the error report.

    Raises:
        TraceValidationError: At least one item is invalid.
    """
    traces: list[LLMTrace] = []
    problems: list[tuple[int, str, str]] = []
    for index, item in enumerate(items, start):
        if isinstance(item, LLMTrace):
            # Built objects were validated when built; model_copy(update=...) and model_construct skip that, and
            # a blank organization would store a trace that no read can reach. (Values the columns cannot hold
            # are refused by ClickHouse, for the whole batch.)
            if not isinstance(item.organization_id, str) or not item.organization_id.strip():
                problems.append((index, "organization_id", "must name the organization the trace belongs to"))
            traces.append(item)
        elif isinstance(item, Mapping):
            try:
                traces.append(LLMTrace.model_validate(item))
            except ValidationError as exc:
                for error in exc.errors():
                    field = ".".join(str(part) for part in error["loc"]) or "(item)"
                    problems.append((index, field, error["msg"]))
        else:
            problems.append((index, "(item)", f"expected an LLMTrace or a mapping, got {type(item).__name__}"))
    if problems:
        raise TraceValidationError(problems)
    return traces


def validated_batches(items: Iterable[TraceInput], batch_size: int) -> Iterator[list[LLMTrace]]:
    """Consume ``items`` in batches of ``batch_size``, validating each before yielding it."""
    iterator = iter(items)
    start = 0
    while chunk := list(islice(iterator, batch_size)):
        yield validate_traces(chunk, start=start)
        start += len(chunk)


class RetentionCheck:
    """Refuses traces that the table's row retention has expired, or will within :attr:`MARGIN`.

    The retention and the server's clock are read once per ``add_many`` call, and only for a batch holding a trace
    older than :attr:`RECENT`: retention is at least a day, so a live batch cannot hold an expired trace even with
    this machine's clock hours off, and pays no query. The cutoff then moves with this process's monotonic clock.

    Args:
        client: The clickhouse-connect client of the connection the batches are written through.
        storage_table: The table that holds the rows (on a cluster, the local table), whose TTL is the retention.
    """

    RECENT = timedelta(hours=12)
    # Traces this close to expiring are refused as well: the insert and its count take far less, so nothing
    # add_many stores expires before step 5 counts it.
    MARGIN = timedelta(minutes=10)

    def __init__(self, client: Any, storage_table: str) -> None:
        self._client = client
        self._storage_table = storage_table
        self._read: tuple[datetime | None, int | None, float] | None = None  # cutoff, days, monotonic time of read

    def refuse_expired(self, traces: list[LLMTrace], *, start: int) -> None:
        """Raise :class:`TraceValidationError` listing the traces of ``traces`` the retention has expired.

        Args:
            traces: Validated traces.
            start: Index of the first one within the caller's whole input, for the error report.
        """
        if not traces or datetime.now(UTC) - min(map(_CREATED_AT, traces)) < self.RECENT:
            return
        cutoff, days = self._cutoff()
        if cutoff is None:
            return
        message = (
            f"is older than the table's row retention of {days} day(s), so ClickHouse would drop it at once. "
            "Leave such traces out, or lengthen the retention with llmtrace.set_retention"
        )
        expired = [index for index, trace in enumerate(traces, start) if trace.created_at < cutoff]
        if expired:
            raise TraceValidationError([(index, "created_at", message) for index in expired])

    def _cutoff(self) -> tuple[datetime | None, int | None]:
        if self._read is None:
            with database_errors("reading the traces table's retention"):
                retention, server_now = read_row_retention(self._client, self._storage_table)
            cutoff = retention.cutoff(as_utc(server_now) + self.MARGIN)
            self._read = (cutoff, retention.rows_days, time.monotonic())
        cutoff, days, read_at = self._read
        return (None, None) if cutoff is None else (cutoff + timedelta(seconds=time.monotonic() - read_at), days)


# -- before the first batch -----------------------------------------------------------------------------------


def require_current_schema(client: Any) -> None:
    """Refuse to write into a table without the ``insert_attempt`` column, before anything is written.

    Without it step 5 cannot count what an insert stored; the insert itself would succeed, and every retry
    would then fail after it.

    Raises:
        SchemaNotMigratedError: The table is missing or predates migration 0003.
    """
    parameters = {"table": TABLE_NAME, "column": INSERT_ATTEMPT_COLUMN}
    with database_errors("checking the traces table's schema"):
        present = client.query(_HAS_ATTEMPT_COLUMN, parameters=parameters).result_rows[0][0]
    if not present:
        raise SchemaNotMigratedError(
            f"The {TABLE_NAME} table of this database is missing, or predates migration 0003 (its "
            f"{INSERT_ATTEMPT_COLUMN} column, which exactly-once writes need). Bring it up to date with "
            "`alembic upgrade head`, `llmtrace migrate` or llmtrace.migrations.upgrade(engine); nothing was written."
        )


# -- 2. to 5., per batch --------------------------------------------------------------------------------------


def write_batch(client: Any, stored: StoredTraces, traces: list[LLMTrace], *, skip_stored: bool) -> int:
    """Store a validated batch exactly once and return how many rows this call stored.

    Args:
        client: The clickhouse-connect client of the connection to write through.
        stored: The stored-trace lookup of that connection.
        traces: The batch.
        skip_stored: Look up and skip traces already stored (step 3).
    """
    columns = without(insert_column_data(traces), set())
    # The first token names the batch as the caller sent it, before the lookup: an attempt whose lookup runs
    # while an earlier attempt of the same batch is landing sends fewer traces, but under the same token.
    first_token = batch_token(columns[ORGANIZATION], columns[ID], round_number=0)
    if skip_stored:
        with database_errors(f"checking which of {len(traces)} traces are already stored"):
            skipped = stored.identities(BatchKeys.from_columns(columns))
        columns = without(columns, skipped)
    return insert_exactly_once(client, stored, columns, first_token=first_token) if columns[ID] else 0


def without(columns: list[list[Any]], dropped: set[Identity]) -> list[list[Any]]:
    """``columns`` without the rows whose identity is in ``dropped``, nor repeats of an identity (first wins)."""
    # The common case, nothing to drop, is told apart by a set of ids built in C: no Python loop per trace.
    if not dropped and len(set(columns[ID])) == len(columns[ID]):
        return columns
    seen = set(dropped)
    keep = []
    for identity in zip(columns[ORGANIZATION], columns[ID], strict=True):
        keep.append(identity not in seen)
        seen.add(identity)
    return [[value for value, kept in zip(column, keep, strict=True) if kept] for column in columns]


def insert_exactly_once(client: Any, stored: StoredTraces, columns: list[list[Any]], *, first_token: str) -> int:
    """Steps 4 and 5: insert until every row of ``columns`` is stored; return the rows these inserts stored.

    Round 0 sends ``first_token``; each later round names what it sends and its round number.
    """
    written = 0
    for round_number in range(MAX_ROUNDS):
        sent = len(columns[ID])
        attempt = new_attempt_id()
        token = first_token if round_number == 0 else batch_token(columns[ORGANIZATION], columns[ID], round_number)
        settings = {**INSERT_SETTINGS, "insert_deduplication_token": token, "log_comment": attempt}
        with database_errors(f"inserting {sent} traces"):
            insert_as_one_block(client, columns, settings)
        count = partial(rows_of_attempt, client, attempt, columns[CREATED_AT], settings=stored.read_settings)
        mine = confirmed(sent, count)
        written += mine
        if mine == sent:
            return written
        # ClickHouse dropped some blocks as repeats of this token. Whatever is stored now is done; the rest lost
        # its earlier copy (deleted, dropped, truncated) and goes again under the next token.
        present = confirmed(sent, partial(_stored_identities, stored, BatchKeys.from_columns(columns), sent))
        columns = without(columns, present)
        if not columns[ID]:
            return written
    raise DatabaseError(
        f"{len(columns[ID])} trace(s) were dropped as duplicates {MAX_ROUNDS} times in a row without being stored; "
        "the same batch was erased and written again that many times. Send these traces in a new batch."
    )


def _stored_identities(stored: StoredTraces, keys: BatchKeys, sent: int) -> set[Identity]:
    with database_errors(f"checking which of {sent} traces are stored after a deduplicated insert"):
        return {(organization, trace_id) for organization, _, _, trace_id in stored.stored_keys(keys)}


ReadT = TypeVar("ReadT")


def confirmed(sent: int, read: Callable[[], ReadT]) -> ReadT:
    """Run a read that settles what an insert of ``sent`` traces stored, retrying it briefly if it fails.

    The insert is done by then, so a failure here must not read as "nothing was written": a short outage (a
    restarted server, a table renamed away and back) is waited out; a longer one raises
    :class:`WriteUnconfirmed`, which says the traces may be stored and that sending the batch again is safe.
    """
    delay = CONFIRM_FIRST_DELAY
    for attempt in range(CONFIRM_ATTEMPTS):
        try:
            return read()
        except DatabaseError as exc:
            if attempt == CONFIRM_ATTEMPTS - 1:
                raise WriteUnconfirmed(
                    f"{sent} trace(s) were sent to ClickHouse and may be stored, but what was stored could not be "
                    "read back; sending the same batch again is safe and settles it. The last failure: " + str(exc),
                    code=exc.code,
                ) from exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


def insert_as_one_block(client: Any, columns: list[list[Any]], settings: dict[str, Any]) -> None:
    """Insert ``columns`` as a single Native block.

    clickhouse-connect cuts an insert into blocks of about 2 MB, sized from a sample of the data, and ClickHouse
    derives each block's deduplication token from the insert's token and the block's position. Two attempts of a
    batch that differ in what the lookup left of it would be cut differently, and their blocks would not meet
    under the token. The driver's public insert() has no block size argument; its insert context has
    one (``req_block_size``), read when data is assigned.
    """
    context = client.create_insert_context(
        TABLE_NAME, list(CLICKHOUSE_COLUMNS), column_oriented=True, settings=settings
    )
    context.req_block_size = len(columns[0])
    context.data = columns
    client.insert(context=context)


def rows_of_attempt(
    client: Any, attempt: str, created_at: list[int], *, settings: Mapping[str, Any] | None = None
) -> int:
    """How many rows the insert that carried ``attempt`` stored.

    The time range only narrows the partitions to look at; the minmax index on the attempt column then skips
    every part written before this attempt. On a cluster the count reads the Distributed table, i.e. every
    shard; ``settings`` are the deployment's read settings (:meth:`llmtrace.topology.Topology.read_settings`).
    """
    parameters = {"attempt": attempt, "earliest": min(created_at), "latest": max(created_at)}
    with database_errors("counting the rows an insert stored"):
        return int(client.query(_ROWS_OF_ATTEMPT, parameters=parameters, settings=settings).result_rows[0][0])


def new_attempt_id() -> str:
    """A fresh insert attempt id: time-ordered (hex nanoseconds) so that older parts' minmax ranges exclude it."""
    return f"{INSERT_ATTEMPT_PREFIX}{time.time_ns():016x}{secrets.token_hex(4)}"


def batch_token(organization_ids: list[str], ids: list[str], round_number: int) -> str:
    """The deduplication token of a batch: a digest of its identities in order, and of the round.

    Every attempt of a batch sends the same traces in the same order, so it gets the same token at each round.
    The identities are digested as JSON, which is unambiguous (no two different pairs of lists serialise
    alike) and fast.
    """
    listed = json.dumps([round_number, organization_ids, ids], ensure_ascii=False)
    return hashlib.sha256(listed.encode("utf-8", "surrogatepass")).hexdigest()
