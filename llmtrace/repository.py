"""TraceRepository: what services call to write, read and report on traces.

Writes go through clickhouse-connect's native insert (column data sent in ClickHouse's Native format), not
through SQLAlchemy's executemany, which is several times slower. Reads and reports are SQLAlchemy Core
statements on :class:`LLMTraceRecord` with bound parameters: no user value is ever formatted into SQL here.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from tqdm import tqdm

from llmtrace.alter_delete import delete_statement
from llmtrace.conversion import trace_from_row
from llmtrace.engine import driver_client, is_embedded
from llmtrace.errors import DatabaseError, TraceNotFound, database_errors
from llmtrace.filters import ALL_ORGANIZATIONS, OrganizationScope, TraceFilter, require_organization
from llmtrace.ingest import (
    RetentionCheck,
    TraceInput,
    require_current_schema,
    validate_traces,
    validated_batches,
    write_batch,
)
from llmtrace.model import MICROS_PER_DAY, MICROS_PER_HOUR, LLMTrace
from llmtrace.pagination import Position, TracePage, decode_cursor, encode_cursor
from llmtrace.prices import prices_change_inside_days
from llmtrace.record import TABLE_NAME, TRACES_TABLE
from llmtrace.retention import read_row_retention
from llmtrace.rollup import (
    ROLLUPS,
    Rollup,
    answerable,
    existing,
    rebuild_statements,
    refresh_statements,
)
from llmtrace.stored_lookup import StoredTraces
from llmtrace.topology import SINGLE, Topology, configured, deployed, require_embeddable
from llmtrace.usage import USAGE_SOURCES, UsageRow, period_start, usage_row, usage_statement, validate_grouping

TABLE = TRACES_TABLE
DEFAULT_BATCH_SIZE = 10_000
MAX_PAGE_SIZE = 10_000


class TraceRepository:
    """Write, read and report on LLM traces stored in ClickHouse.

    Every method that reads, counts, reports on or deletes traces requires an ``organization_id``, checked at
    run time (``None`` or ``""`` raise), and only ever touches that organization's traces. Reports and counts
    across organizations are asked for by name, with :data:`llmtrace.ALL_ORGANIZATIONS`. Database failures
    raise :class:`llmtrace.errors.DatabaseError` with the driver's exception as ``__cause__``.

    Args:
        engine: An engine from :func:`llmtrace.get_engine` whose database has been migrated.
        topology: The deployment (``"single"``, ``"cluster:<name>"``, ``"replicated"``, ``"cloud"``, or a
            :class:`~llmtrace.topology.Topology`). ``None`` uses ``LLMTRACE_TOPOLOGY``, else the topology the
            database's table was deployed with. It decides where inserts and deletes go and how stored traces
            are looked up (:mod:`llmtrace.topology`).

    Raises:
        ConfigurationError: ``topology`` (or ``LLMTRACE_TOPOLOGY``) is malformed, or is not ``single`` for an
            embedded engine.
    """

    def __init__(self, engine: Engine, *, topology: Topology | str | None = None) -> None:
        self.engine = engine
        self._schema_checked = False  # whether the table has been seen to be migrated far enough to write
        self._topology = configured(topology, source="topology")
        if self._topology is not None and is_embedded(engine):
            require_embeddable(self._topology)

    @property
    def destination(self) -> str:
        """``database.table`` that this repository writes to, e.g. to tell apart spooled traces of several."""
        return f"{self.engine.url.database or 'default'}.{TABLE_NAME}"

    # -- writes -------------------------------------------------------------------------------------------

    def add(self, trace: TraceInput) -> None:
        """Store one trace (an :class:`LLMTrace` or a mapping of its fields). See :meth:`add_many`."""
        self.add_many([trace])

    def add_many(
        self,
        traces: Iterable[TraceInput],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        skip_stored: bool = True,
        progress: bool = False,
    ) -> int:
        """Store traces in batches, exactly once; the steps and the argument are in :mod:`llmtrace.ingest`.

        Validation is atomic: when ``traces`` is a sequence (list, tuple), every item is validated before
        anything is written, and one invalid item means nothing is written. Other iterables (generators) are
        consumed ``batch_size`` items at a time so that memory stays bounded; each batch is validated before
        it is written, so an invalid item stops the call with the earlier batches already stored. Whatever
        stops a call part-way, its exception carries a note saying how many traces earlier batches stored.

        What is deduplicated: a trace is identified by ``(organization_id, id)``. Within a batch, repeats of
        an identity are written once (the first wins); a repeat in a later batch of the same call is found by
        the lookup, so with ``skip_stored=False`` it is written again. With ``skip_stored`` (the default),
        traces already stored are skipped, so re-sending a batch, or a batch that overlaps earlier ones, stores
        each trace once; the lookup recognises a stored copy by its sort key and id, i.e. it must also have the
        same ``agent_id`` and ``created_at``, which a re-sent trace does. A batch retried while its first attempt
        may still be landing (e.g. after a timeout), or sent by two threads or processes at once, is stored
        once by ClickHouse itself through an ``insert_deduplication_token`` derived from the batch's
        identities; after a :meth:`delete`, traces written again are stored again.

        What is not: two overlapping (not identical) batches written at the same moment can both pass the
        lookup; a trace re-created with the same id but another ``agent_id`` or ``created_at`` is another
        trace to the lookup; with ``skip_stored=False``, a retry that arrives after more than the table's
        deduplication window (its last 10,000 blocks, one per partition an insert touches) is stored again.

        Args:
            traces: :class:`LLMTrace` objects or mappings of their fields (validated like the model).
            batch_size: Traces per insert; each batch is one insert statement.
            skip_stored: Look up which traces of each batch are already stored and skip them. Turn it off only
                when batches never overlap (identical retries are still deduplicated by the token).
            progress: Show a progress bar on stderr, with a total when ``traces`` has a length or a length hint.

        Retention (:func:`llmtrace.set_retention`): a trace older than the table's row retention is invalid,
        since ClickHouse would drop it at its next merge; one older than the payload retention is stored, and its
        payloads are emptied at the next merge.

        Returns:
            The number of rows this call stored: repeats, traces already stored and blocks ClickHouse dropped
            as duplicates are not counted.

        Raises:
            TraceValidationError: Listing every invalid item by index and field (traces past the row retention
                included).
            DatabaseError: ClickHouse failed or could not be reached.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int of at least 1, got {batch_size!r}")
        if isinstance(traces, (LLMTrace, Mapping, str, bytes)):
            # Each is iterable (a model yields (field, value) pairs), so without this check it would fail item
            # by item with errors that do not say what went wrong.
            raise TypeError(
                f"add_many() takes an iterable of traces, got a single {type(traces).__name__}; "
                "use add() for one trace, or wrap it in a list"
            )
        # Sequences have a length; other iterables may announce one (__length_hint__) for the progress bar.
        total = operator.length_hint(traces) or None
        validated: list[LLMTrace] | None = None
        if isinstance(traces, Sequence):
            validated = validate_traces(traces, start=0)
        written = 0
        bar = tqdm(total=total, disable=not progress, unit="trace", desc="writing traces")
        with bar, database_errors("opening a connection to write traces"), self.engine.connect() as connection:
            client = driver_client(connection)
            topology = self._deployment(client)
            stored = StoredTraces.for_topology(client, topology, embedded=is_embedded(self.engine))
            if not self._schema_checked:
                require_current_schema(client)
                self._schema_checked = True
            retention = RetentionCheck(client, topology.storage_table(TABLE_NAME))
            batches: Iterable[list[LLMTrace]]
            if validated is not None:
                # A list is refused whole, before anything is written, as for any other invalid item.
                retention.refuse_expired(validated, start=0)
                batches = (validated[i : i + batch_size] for i in range(0, len(validated), batch_size))
            else:
                batches = _refusing_expired(validated_batches(traces, batch_size), retention, batch_size)
            try:
                for batch in batches:
                    written += write_batch(client, stored, batch, skip_stored=skip_stored)
                    bar.update(len(batch))
            except Exception as exc:
                exc.add_note(f"llmtrace: {written} trace(s) from earlier batches of this call were stored.")
                raise
        return written

    # -- reads --------------------------------------------------------------------------------------------

    def get(self, organization_id: str, trace_id: str) -> LLMTrace:
        """Return the trace whose ``id`` is ``trace_id`` in ``organization_id``.

        ``trace_id`` here is the trace's own ``id`` (not the OTEL ``trace_id`` column, which :meth:`list`
        filters on).

        Raises:
            TraceNotFound: No such trace in that organization.
            TypeError, ValueError: ``organization_id`` does not name one organization, or ``trace_id`` is no str.
        """
        require_organization(organization_id, method="get")
        if not isinstance(trace_id, str):
            raise TypeError(f"get() needs trace_id, the trace's id, as a str; got {trace_id!r}")
        statement = select(TABLE).where(TABLE.c.organization_id == organization_id, TABLE.c.id == trace_id).limit(1)
        with database_errors(f"reading trace {trace_id!r}"), self.engine.connect() as connection:
            row = connection.execute(statement).first()
        if row is None:
            raise TraceNotFound(f"No trace with id {trace_id!r} in organization {organization_id!r}.")
        return trace_from_row(row)

    def list(
        self,
        organization_id: str,
        *,
        agent_id: str | None = None,
        project_id: str | None = None,
        run_id: str | None = None,
        step_id: str | None = None,
        trace_id: str | None = None,
        model: str | None = None,
        provider: str | None = None,
        call_type: str | None = None,
        billing_plan_type: str | None = None,
        billing_cost_source: str | None = None,
        billing_customer_id: str | None = None,
        is_byok: bool | None = None,
        is_error: bool | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TracePage:
        """Return one page of an organization's traces, newest first.

        Pagination is keyset-based on ``(created_at, id)``: pages do not shift when newer traces arrive
        between two calls. A cursor only works with the organization and filters it was issued for.

        Args:
            organization_id: The organization whose traces to list.
            agent_id: Only this agent's traces (likewise ``project_id``, ``run_id``, ``step_id``, ``model``,
                ``provider``, ``call_type``, ``billing_plan_type``, ``billing_cost_source``,
                ``billing_customer_id``, ``is_byok``, ``is_error``).
            trace_id: Only traces with this OTEL trace id.
            since: Only traces created at or after this instant.
            until: Only traces created before this instant.
            limit: Page size, 1 to 10,000.
            cursor: ``next_cursor`` of the previous page.

        Raises:
            InvalidCursor: The cursor is malformed or belongs to another organization or other filters.
            TypeError, ValueError: ``organization_id`` does not name one organization, or ``limit`` is not an
                int between 1 and 10,000.
        """
        require_organization(organization_id, method="list")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, got {limit!r}")
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
        trace_filter = TraceFilter(
            organization_id=organization_id, agent_id=agent_id, project_id=project_id, run_id=run_id,
            step_id=step_id, trace_id=trace_id, model=model, provider=provider, call_type=call_type,
            billing_plan_type=billing_plan_type, billing_cost_source=billing_cost_source,
            billing_customer_id=billing_customer_id, is_byok=is_byok, is_error=is_error, since=since, until=until,
        )  # fmt: skip
        fingerprint = trace_filter.fingerprint()
        statement = trace_filter.apply(select(TABLE))
        if cursor is not None:
            position = decode_cursor(cursor, organization_id=organization_id, fingerprint=fingerprint)
            statement = statement.where(position.after())
        statement = statement.order_by(TABLE.c.created_at.desc(), TABLE.c.id.desc()).limit(limit + 1)
        with database_errors("listing traces"), self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        items = [trace_from_row(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = encode_cursor(
                Position(created_at=last.created_at, id=last.id),
                organization_id=organization_id,
                fingerprint=fingerprint,
            )
        return TracePage(items=items, next_cursor=next_cursor)

    def count(self, organization_id: OrganizationScope, **filters: Any) -> int:
        """Count an organization's traces matching the same filters as :meth:`list` (keyword arguments).

        ``organization_id`` may be :data:`llmtrace.ALL_ORGANIZATIONS` to count across organizations.
        """
        trace_filter = _filter(organization_id, filters, method="count")
        with database_errors("counting traces"), self.engine.connect() as connection:
            return int(connection.execute(trace_filter.apply(select(func.count()).select_from(TABLE))).scalar_one())

    def organizations(self, **filters: Any) -> builtins.list[tuple[str, int]]:
        """Every organization with traces matching the filters of :meth:`list`, and how many, ordered by id.

        A plain count per organization, for jobs that walk every organization's traces (``llmtrace export
        --all-organizations``). Traces another writer stored without an organization id are counted under ``""``.
        """
        trace_filter = _filter(ALL_ORGANIZATIONS, filters, method="organizations")
        organization = TABLE.c.organization_id
        statement = trace_filter.apply(select(organization, func.count()).select_from(TABLE))
        with database_errors("counting traces by organization"), self.engine.connect() as connection:
            rows = connection.execute(statement.group_by(organization).order_by(organization)).all()
        return [(str(row[0]), int(row[1])) for row in rows]

    # -- reports ------------------------------------------------------------------------------------------

    def usage(
        self,
        organization_id: OrganizationScope,
        *,
        group_by: Sequence[str] = ("model",),
        since: datetime | None = None,
        until: datetime | None = None,
        granularity: str | None = None,
        percentiles: str | None = "exact",
        source: str = "auto",
        **filters: Any,
    ) -> builtins.list[UsageRow]:
        """Token, byte, error and latency totals per group (and per time bucket).

        Args:
            organization_id: One organization, or :data:`llmtrace.ALL_ORGANIZATIONS` for all of them (the
                operator's view); ``None`` is refused, so that a lost caller identity never widens a report.
            group_by: Any of organization_id, project_id, agent_id, model, provider, call_type, is_byok,
                is_error, billing_plan_type, billing_cost_source, billing_customer_id; ``()`` for one grand total.
            since: Only traces created at or after this instant.
            until: Only traces created before this instant.
            granularity: ``"hour"``, ``"day"`` or ``"month"`` to add a UTC time bucket, or ``None``.
            percentiles: ``"exact"`` latency percentiles (memory grows with the number of traces per group),
                ``"approximate"`` ones (a t-digest: bounded memory, usually within about 1%), for reports
                over very many traces, or ``None`` for none (the ``latency_p*`` fields are ``None``): the
                fastest, for cost and token reports. Only approximate percentiles or none can come from a rollup;
                merging its percentile states is most of the time a rollup report takes over many groups.
            source: Where the totals come from: ``"auto"`` (the daily rollup, else the hourly one, whenever it can
                answer exactly what the traces would, else the traces), ``"raw"`` (always the traces),
                ``"rollup"`` (the first rollup that can answer, or ``ValueError`` saying why none can), or
                ``"daily"`` / ``"hourly"`` (that rollup, or ``ValueError``). Each row's ``source`` says which
                answered: ``"raw"``, ``"daily"`` or ``"hourly"``.
            **filters: The filters of :meth:`list` (agent_id, model, is_error, ...).

        Returns:
            One :class:`UsageRow` per group, ordered by bucket then group keys; no rows when no trace matches.
        """
        keys = validate_grouping(group_by, granularity, percentiles)
        if source not in USAGE_SOURCES:
            raise ValueError(f"source: unknown value {source!r}; use one of {', '.join(USAGE_SOURCES)}")
        trace_filter = _filter(organization_id, {**filters, "since": since, "until": until}, method="usage")
        with database_errors("computing usage"), self.engine.connect() as connection:
            kept = self._within_retention(connection, trace_filter)
            if kept is None:
                return []  # the whole range is past the row retention
            trace_filter = kept
            prices_inside = prices_change_inside_days(connection, trace_filter.since, trace_filter.until)
            chosen = self._usage_source(connection, source, trace_filter, percentiles, keys, granularity, prices_inside)
            statement = usage_statement(
                keys,
                granularity,
                percentiles,
                trace_filter,
                chosen,
                price_period=MICROS_PER_HOUR if prices_inside else MICROS_PER_DAY,
            )
            rows = connection.execute(statement).mappings().all()
        answered = "raw" if chosen is None else chosen.name
        return [usage_row(row, keys, granularity, answered) for row in rows]

    def _within_retention(self, connection: Connection, trace_filter: TraceFilter) -> TraceFilter | None:
        """``trace_filter`` starting no earlier than the first whole UTC day the row retention keeps in full.

        Expired traces leave ClickHouse with their part, at a time merges decide, and the rollups' hours and days
        with theirs: a report that counted whatever is still on disk would change from one run to the next and
        differ between the sources. Cutting all at the same whole day keeps them equal and stable. ``None``: the
        whole range asked for is past the retention.
        """
        client = driver_client(connection)
        topology = self._deployment(client)
        retention, now = read_row_retention(client, topology.storage_table(TABLE_NAME))
        cutoff = retention.first_whole_day(now)
        if cutoff is None:
            return trace_filter
        if trace_filter.since is not None and trace_filter.since >= cutoff:
            return trace_filter
        if trace_filter.until is not None and trace_filter.until <= cutoff:
            return None
        return replace(trace_filter, since=cutoff)

    def _usage_source(
        self,
        connection: Connection,
        asked: str,
        trace_filter: TraceFilter,
        percentiles: str | None,
        keys: tuple[str, ...],
        granularity: str | None,
        prices_inside: bool,
    ) -> Rollup | None:
        """The rollup that answers a report (``None``: the traces), given what was asked (see :meth:`usage`)."""
        if asked == "raw":
            return None
        # Looked up for every report a rollup could answer (about a millisecond), not remembered: a migration or a
        # downgrade while this repository lives adds or removes them.
        present: frozenset[str] | None = None
        reasons = []
        for rollup in ROLLUPS:
            if asked not in ("auto", "rollup", rollup.name):
                continue
            reason = answerable(rollup, trace_filter, percentiles, keys, granularity, prices_inside)
            if reason is None:
                present = existing(connection) if present is None else present
                if rollup.name not in present:
                    reason = f"the database has no {rollup.name} rollup yet (run the migrations: llmtrace migrate)"
            if reason is None:
                return rollup
            reasons.append(f"the {rollup.name} rollup: {reason}")
        if asked == "auto":
            return None
        raise ValueError(f"source={asked!r} cannot answer this report: {'; '.join(reasons)}")

    # -- deletes ------------------------------------------------------------------------------------------

    def delete(
        self,
        organization_id: str,
        *,
        agent_id: str | None = None,
        run_id: str | None = None,
        before: datetime | None = None,
        erase: bool = True,
    ) -> int:
        """Remove an organization's traces (all, or one agent's, one run's, or those before a time).

        With ``erase`` (the default), the data parts holding matching rows are rewritten without them before
        this returns (a synchronous ``ALTER TABLE ... DELETE``): the data is gone from disk, which is what an
        erasure request needs, at the cost of rewriting those parts. With ``erase=False`` the rows are only
        masked (a lightweight ``DELETE FROM``): hidden from every query at once and cheap, but still on disk
        until merges rewrite their parts. Either way the method then reads again and raises if any matching
        row is still visible. Traces written again after a delete are stored again; that includes traces
        still waiting in a :class:`llmtrace.TraceWriter`'s buffer or spool, so flush writers before erasing.

        Returns:
            The number of traces removed.

        Raises:
            DatabaseError: ClickHouse failed, or matching rows were still found afterwards.
            TypeError, ValueError: ``organization_id`` does not name one organization (a delete never spans
                several).
        """
        require_organization(organization_id, method="delete")
        trace_filter = TraceFilter(organization_id=organization_id, agent_id=agent_id, run_id=run_id, until=before)
        day = period_start(TABLE.c.created_at, MICROS_PER_DAY)
        # How many traces match, and the days they fall in: the rollups' rows for those days are redone after.
        counting = select(func.count(), func.min(day), func.max(day)).select_from(TABLE).where(*trace_filter.clauses())
        with database_errors("deleting traces"), self.engine.connect() as connection:
            topology = self._deployment(driver_client(connection))
            matching, first_day, last_day = connection.execute(counting).one()
            if matching:
                # On a cluster: the local table, ON CLUSTER (a Distributed table has nothing to delete).
                removing = delete_statement(TABLE, trace_filter.clauses(), erase=erase, topology=topology)
                connection.execute(removing, execution_options={"settings": {"mutations_sync": 2}})
            remaining = int(connection.execute(counting).one()[0])
            present = existing(connection) if matching else frozenset()
            if present:
                for statement in refresh_statements(organization_id, first_day, last_day, present, topology):
                    connection.execute(statement)
        if remaining:
            raise DatabaseError(f"{remaining} matching trace(s) are still present after the delete; retry it.")
        return int(matching)

    def rebuild_rollup(self) -> None:
        """Compute the hourly rollup again from every stored trace.

        Needed only if it was ever filled while traces were being written by the migration that created it
        (which counts a trace written at that moment twice), or after changing ``llm_traces`` by hand. Reports that
        read the rollup see it empty while this runs; pause writers, or a trace written meanwhile may be
        counted twice.
        """
        with database_errors("rebuilding the usage rollup"), self.engine.connect() as connection:
            topology = self._deployment(driver_client(connection))
            for statement in rebuild_statements(existing(connection), topology):
                connection.execute(statement)

    # -- deployment ---------------------------------------------------------------------------------------

    def _deployment(self, client: Any) -> Topology:
        """The topology writes and deletes follow: the one set, else the one the table was deployed with.

        Read from the server once (the embedded engine is always single); before the table exists there is
        nothing to find out, and nothing to write to either.
        """
        if self._topology is None:
            # Inside the caller's error mapping, which words a failure after what the caller was doing.
            found = SINGLE if is_embedded(self.engine) else deployed(client)
            if found is None:
                return SINGLE
            self._topology = found
        return self._topology


def _refusing_expired(
    batches: Iterable[list[LLMTrace]], retention: RetentionCheck, batch_size: int
) -> Iterator[list[LLMTrace]]:
    """``batches`` (of ``batch_size`` each but the last), each checked against the retention before it is written."""
    for number, batch in enumerate(batches):
        retention.refuse_expired(batch, start=number * batch_size)
        yield batch


def _filter(organization_id: object, filters: Mapping[str, Any], *, method: str) -> TraceFilter:
    """The filter of a report or count, which may span every organization when asked by name."""
    scope = require_organization(organization_id, method=method, across=True)
    try:
        return TraceFilter(organization_id=scope, **filters)
    except TypeError as exc:
        accepted = ", ".join(name for name in TraceFilter.__dataclass_fields__ if name != "organization_id")
        raise TypeError(f"{exc}; the accepted filters are {accepted}") from exc
