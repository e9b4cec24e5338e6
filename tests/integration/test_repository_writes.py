"""TraceRepository writes: exactly once, atomic validation, lossless round trip."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, text

from llmtrace import LLMTrace, SchemaNotMigratedError, TraceRepository, TraceValidationError, WriteUnconfirmed, ingest
from llmtrace.engine import driver_client
from llmtrace.migrations import downgrade, upgrade
from llmtrace.model import insert_column_data
from llmtrace.stored_lookup import PROBE_PAUSE, STAGING_TABLE, BatchKeys, StoredTraces
from llmtrace.synthetic import synthetic_traces
from tests.factories import BASE_TIME, make_trace
from tests.strategies import llm_traces


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    return TraceRepository(migrated_engine)


def stored_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count() FROM llm_traces")).scalar_one())


def test_add_then_get(repository: TraceRepository) -> None:
    trace = make_trace(1)
    repository.add(trace)
    assert repository.get("org-1", trace.id) == trace


def test_same_batch_three_times_is_stored_once(repository: TraceRepository, migrated_engine: Engine) -> None:
    batch = [make_trace(i) for i in range(500)]
    assert repository.add_many(batch, batch_size=200) == 500
    assert repository.add_many(batch, batch_size=200) == 0
    assert repository.add_many(batch, batch_size=200) == 0
    assert stored_rows(migrated_engine) == 500


def test_identical_retries_are_deduplicated_by_clickhouse_alone(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    # Without the lookup, only the insert deduplication token stands between a retry and a second copy.
    batch = [make_trace(i) for i in range(300)]
    for _ in range(3):
        repository.add_many(batch, batch_size=100, skip_stored=False)
    assert stored_rows(migrated_engine) == 300


@pytest.mark.parametrize("skip_stored", [True, False])
@pytest.mark.parametrize("erase", [True, False])
def test_traces_written_again_after_a_delete_are_stored_again(
    repository: TraceRepository, skip_stored: bool, erase: bool
) -> None:
    # The same batch gets the same insert token; the delete must make ClickHouse accept it again.
    batch = [make_trace(i) for i in range(50)]
    assert repository.add_many(batch, skip_stored=skip_stored) == 50
    assert repository.delete("org-1", erase=erase) == 50
    assert repository.add_many(batch, skip_stored=skip_stored) == 50
    assert repository.count("org-1") == 50
    repository.add_many(batch, skip_stored=skip_stored)  # and a retry of that is still stored once
    assert repository.count("org-1") == 50


def test_without_the_lookup_overlapping_batches_duplicate(repository: TraceRepository, migrated_engine: Engine) -> None:
    # The documented limit of skip_stored=False: a different batch is a different block to ClickHouse.
    repository.add_many([make_trace(i) for i in range(10)], skip_stored=False)
    repository.add_many([make_trace(i) for i in range(5, 15)], skip_stored=False)
    assert stored_rows(migrated_engine) == 20


def test_overlapping_batches_store_each_trace_once(repository: TraceRepository, migrated_engine: Engine) -> None:
    assert repository.add_many([make_trace(i) for i in range(0, 100)]) == 100
    assert repository.add_many([make_trace(i) for i in range(50, 150)]) == 50
    assert repository.add_many([make_trace(i) for i in range(25, 175)], batch_size=40) == 25
    with migrated_engine.connect() as connection:
        ids = connection.execute(text("SELECT id, count() FROM llm_traces GROUP BY id HAVING count() > 1")).all()
    assert ids == []
    assert stored_rows(migrated_engine) == 175


def test_repeats_within_a_call_are_written_once(repository: TraceRepository, migrated_engine: Engine) -> None:
    first = make_trace(1, model="first")
    assert repository.add_many([first, make_trace(2), make_trace(1, model="second"), make_trace(2)]) == 2
    assert repository.get("org-1", first.id).model == "first"


def test_repeats_across_batches_of_one_call_are_written_once(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    def traces() -> Iterator[LLMTrace]:
        yield from (make_trace(i) for i in range(10))
        yield from (make_trace(i) for i in (3, 9, 10, 11, 0))

    assert repository.add_many(traces(), batch_size=5) == 12
    assert stored_rows(migrated_engine) == 12


def test_same_id_in_two_organizations_is_two_traces(repository: TraceRepository) -> None:
    assert repository.add_many([make_trace(1, organization_id="a"), make_trace(1, organization_id="b")]) == 2


def lookup(engine: Engine, batch: list[LLMTrace], *, staging: bool) -> set[tuple[str, str]]:
    with engine.connect() as connection:
        stored = StoredTraces(driver_client(connection), staging=staging)
        return stored.identities(BatchKeys.from_columns(insert_column_data(batch)))


@pytest.mark.parametrize("staging", [True, False], ids=["staging table", "chunks"])
def test_the_lookup_finds_exactly_the_stored_traces(
    repository: TraceRepository, migrated_engine: Engine, staging: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llmtrace.stored_lookup.LITERAL_CHUNK", 7)  # several chunks, one of them partial
    repository.add_many([make_trace(i) for i in range(0, 60, 2)])
    batch = [make_trace(i) for i in range(60)] + [make_trace(0, organization_id="org-2")]
    assert lookup(migrated_engine, batch, staging=staging) == {("org-1", make_trace(i).id) for i in range(0, 60, 2)}


@pytest.mark.parametrize("staging", [True, False], ids=["staging table", "chunks"])
def test_the_lookup_matches_on_sort_key_and_id(migrated_engine: Engine, staging: bool) -> None:
    # Documented limit: a copy with the same id but another created_at or agent is not "the same trace".
    TraceRepository(migrated_engine).add(make_trace(1))
    moved = [make_trace(1, created_at=BASE_TIME + timedelta(days=1)), make_trace(1, agent_id="other")]
    assert lookup(migrated_engine, moved, staging=staging) == set()


def test_dicts_are_validated_like_the_model(repository: TraceRepository) -> None:
    values = make_trace(3).model_dump()
    repository.add_many([values])
    assert repository.get("org-1", values["id"]) == LLMTrace(**values)


def test_an_invalid_item_writes_nothing_and_every_problem_is_listed(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    good = make_trace(0).model_dump()
    batch: list[object] = [
        good,
        {**make_trace(1).model_dump(), "prompt_tokens": -3},
        make_trace(2),
        {**make_trace(3).model_dump(), "model": None, "latency_ms": "slow"},
        "not a trace",
    ]
    with pytest.raises(TraceValidationError) as caught:
        repository.add_many(batch, batch_size=2)  # type: ignore[arg-type]
    problems = {(index, field) for index, field, _ in caught.value.problems}
    assert problems == {(1, "prompt_tokens"), (3, "model"), (3, "latency_ms"), (4, "(item)")}
    message = str(caught.value)
    assert "3 invalid trace(s); nothing from this batch was written" in message
    assert "item 1, prompt_tokens: Input should be greater than or equal to 0" in message
    assert "item 4, (item): expected an LLMTrace or a mapping, got str" in message
    assert stored_rows(migrated_engine) == 0


def test_a_generator_stops_at_the_invalid_batch(repository: TraceRepository, migrated_engine: Engine) -> None:
    def traces() -> Iterator[object]:
        yield from (make_trace(i) for i in range(10))
        yield {"id": "broken"}

    with pytest.raises(TraceValidationError) as caught:
        repository.add_many(traces(), batch_size=4)  # type: ignore[arg-type]
    assert {index for index, _, _ in caught.value.problems} == {10}
    assert caught.value.__notes__ == ["llmtrace: 8 trace(s) from earlier batches of this call were stored."]
    assert stored_rows(migrated_engine) == 8


def test_batch_size_must_be_positive(repository: TraceRepository) -> None:
    with pytest.raises(ValueError, match="batch_size must be an int of at least 1, got 0"):
        repository.add_many([make_trace(1)], batch_size=0)


@pytest.mark.parametrize("single", [make_trace(1), make_trace(1).model_dump()], ids=["LLMTrace", "dict"])
def test_a_single_trace_is_refused_with_a_pointer_to_add(
    repository: TraceRepository, migrated_engine: Engine, single: Any
) -> None:
    with pytest.raises(TypeError, match=r"takes an iterable of traces, got a single (LLMTrace|dict); use add\(\)"):
        repository.add_many(single)
    assert stored_rows(migrated_engine) == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(traces=st.lists(llm_traces(), min_size=1, max_size=8))
def test_any_valid_traces_round_trip(repository: TraceRepository, traces: list[LLMTrace]) -> None:
    batch = [trace.model_copy(update={"id": f"{uuid.uuid4().hex}-{trace.id}"}) for trace in traces]
    assert repository.add_many(batch) == len(batch)
    assert [repository.get(trace.organization_id, trace.id) for trace in batch] == batch


def test_the_probe_skips_the_lookup_only_when_no_copy_can_exist(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    repository.add_many([make_trace(i) for i in range(10)])
    later = [make_trace(i, created_at=BASE_TIME + timedelta(hours=1, seconds=i)) for i in range(100, 110)]
    # As old as the stored traces, but of organizations that sort after every stored one.
    other_organizations = [make_trace(i, organization_id=f"org-{i + 2}") for i in range(3)]
    resent = [make_trace(i) for i in range(5, 15)]
    with migrated_engine.connect() as connection:
        stored = StoredTraces(driver_client(connection))

        def may_hold_copies(batch: list[LLMTrace]) -> bool:
            return stored.may_hold_copies(BatchKeys.from_columns(insert_column_data(batch)))

        assert may_hold_copies(later) is False
        assert may_hold_copies(other_organizations) is False
        assert may_hold_copies(resent) is True
        # The boundary: a stored row created exactly at the batch's earliest instant counts.
        assert may_hold_copies([make_trace(9, id="x")]) is True


class _HintedIterator(Iterator[LLMTrace]):
    """An iterator that announces how many items are left, like many lazy sources do."""

    def __init__(self, traces: list[LLMTrace]) -> None:
        self._traces = iter(traces)
        self._left = len(traces)

    def __next__(self) -> LLMTrace:
        trace = next(self._traces)
        self._left -= 1
        return trace

    def __length_hint__(self) -> int:
        return self._left


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        (list, "30/30"),  # a sequence's length is the bar's total
        (_HintedIterator, "30/30"),  # so is an iterator's length hint
        (lambda traces: (trace for trace in traces), "30trace"),  # a generator has none: the bar counts up
    ],
)
def test_the_progress_bar_shows_a_total_when_the_input_has_one(
    repository: TraceRepository, capsys: pytest.CaptureFixture[str], source: Any, shown: str
) -> None:
    assert repository.add_many(source([make_trace(i) for i in range(30)]), batch_size=10, progress=True) == 30
    assert shown in capsys.readouterr().err


# -- what add_many returns: the rows ClickHouse stored for the call, in every deduplication case ----------------


def test_a_resent_batch_counts_only_its_first_write(repository: TraceRepository, migrated_engine: Engine) -> None:
    batch = [make_trace(i) for i in range(50)]
    assert [repository.add_many(batch, skip_stored=False) for _ in range(3)] == [50, 0, 0]
    assert [repository.add_many(batch) for _ in range(2)] == [0, 0]
    assert stored_rows(migrated_engine) == 50


def send_at_once(repository: TraceRepository, batch: list[LLMTrace], *, senders: int, skip_stored: bool) -> list[int]:
    """What add_many returns to each of ``senders`` threads that send ``batch`` at the same moment."""
    start = threading.Barrier(senders)

    def send() -> int:
        start.wait()
        return repository.add_many(batch, skip_stored=skip_stored)

    with ThreadPoolExecutor(senders) as pool:
        return [future.result() for future in [pool.submit(send) for _ in range(senders)]]


@pytest.mark.parametrize("skip_stored", [True, False])
def test_threads_sending_one_batch_at_once_store_it_once(migrated_engine: Engine, skip_stored: bool) -> None:
    repository = TraceRepository(migrated_engine)
    for round_number in range(5):
        batch = [make_trace(1000 * round_number + i) for i in range(200)]
        returned = send_at_once(repository, batch, senders=3, skip_stored=skip_stored)
        assert sorted(returned) == [0, 0, 200], round_number
    assert stored_rows(migrated_engine) == 1000


@pytest.mark.parametrize("skip_stored", [True, False])
def test_a_retry_after_other_deletes_is_still_stored_once(repository: TraceRepository, skip_stored: bool) -> None:
    # The first attempt landed but its caller never heard back; deletes of another organization and of this
    # organization's other traces happen before the retry. The retry must not store the batch again.
    batch = [make_trace(i, agent_id="agent-kept") for i in range(40)]
    repository.add_many([make_trace(100 + i, organization_id="org-2") for i in range(10)])
    repository.add_many([make_trace(200 + i, agent_id="agent-gone") for i in range(10)])
    assert repository.add_many(batch, skip_stored=skip_stored) == 40
    assert repository.delete("org-2") == 10
    assert repository.delete("org-1", agent_id="agent-gone", erase=False) == 10
    assert repository.add_many(batch, skip_stored=skip_stored) == 0
    assert repository.count("org-1") == 40


@pytest.mark.parametrize("skip_stored", [True, False])
@pytest.mark.parametrize("erase", [True, False])
def test_repeated_delete_and_readd_cycles_store_the_batch_each_time(
    repository: TraceRepository, skip_stored: bool, erase: bool
) -> None:
    batch = [make_trace(i) for i in range(30)]
    for _ in range(3):  # each cycle needs one more token of the sequence than the one before
        assert repository.add_many(batch, skip_stored=skip_stored) == 30
        assert repository.add_many(batch, skip_stored=skip_stored) == 0
        assert repository.delete("org-1", erase=erase) == 30
    assert repository.add_many(batch, skip_stored=skip_stored) == 30
    assert repository.count("org-1") == 30


def two_months() -> list[LLMTrace]:
    """Traces in two monthly partitions: an insert of them is two blocks, deduplicated separately."""
    october = [make_trace(i, created_at=BASE_TIME - timedelta(days=20, seconds=i)) for i in range(25)]
    november = [make_trace(100 + i) for i in range(35)]
    return october + november


@pytest.mark.parametrize("skip_stored", [True, False])
@pytest.mark.parametrize(
    "removal",
    [
        "ALTER TABLE llm_traces DROP PARTITION 202610",
        "ALTER TABLE llm_traces DELETE WHERE toYYYYMM(created_at) = 202610 SETTINGS mutations_sync = 2",
        "DELETE FROM llm_traces WHERE toYYYYMM(created_at) = 202610",
    ],
    ids=["drop partition", "mutation", "lightweight delete"],
)
def test_rows_removed_behind_the_writers_back_are_stored_again(
    repository: TraceRepository, migrated_engine: Engine, skip_stored: bool, removal: str
) -> None:
    # Retention jobs and operators remove rows without telling llmtrace. A block whose token ClickHouse still
    # remembers would then be dropped as a duplicate although its rows are gone: they must be stored again.
    batch = two_months()
    assert repository.add_many(batch, skip_stored=skip_stored) == 60
    with migrated_engine.connect() as connection:
        connection.execute(text(removal))
    assert stored_rows(migrated_engine) == 35
    assert repository.add_many(batch, skip_stored=skip_stored) == 25
    assert repository.add_many(batch, skip_stored=skip_stored) == 0
    assert stored_rows(migrated_engine) == 60
    with migrated_engine.connect() as connection:
        connection.execute(text("TRUNCATE TABLE llm_traces"))
    assert repository.add_many(batch, skip_stored=skip_stored) == 60
    assert stored_rows(migrated_engine) == 60


def test_a_changed_trace_under_a_remembered_token_is_stored(repository: TraceRepository) -> None:
    # Same identities, so the same token; but the trace was re-created at another time: another trace to the
    # lookup, which add_many must store rather than report as deduplicated.
    repository.add_many([make_trace(1)], skip_stored=False)
    moved = make_trace(1, created_at=BASE_TIME + timedelta(days=1))
    assert repository.add_many([moved], skip_stored=False) == 1
    assert repository.count("org-1") == 2


def test_a_failure_part_way_notes_what_earlier_batches_stored(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    def traces() -> Iterator[LLMTrace]:
        yield from (make_trace(i) for i in range(25))
        raise RuntimeError("the source went away")

    with pytest.raises(RuntimeError, match="the source went away") as caught:
        repository.add_many(traces(), batch_size=10)
    assert caught.value.__notes__ == ["llmtrace: 20 trace(s) from earlier batches of this call were stored."]
    assert stored_rows(migrated_engine) == 20


def test_a_table_that_predates_the_attempt_column_is_refused_before_writing(migrated_engine: Engine) -> None:
    downgrade(migrated_engine, "0002")
    repository = TraceRepository(migrated_engine)
    with pytest.raises(SchemaNotMigratedError, match=r"predates migration 0003 .*`llmtrace migrate`"):
        repository.add_many([make_trace(1)])
    assert stored_rows(migrated_engine) == 0
    upgrade(migrated_engine)
    assert repository.add_many([make_trace(1)]) == 1


def test_a_retry_while_the_first_attempt_is_still_landing_stores_the_batch_once(
    migrated_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server profile without insert squashing (as a batch over 256 MiB gets by default) cuts an insert into
    # many blocks, committed one by one. A retry whose lookup runs after the first attempt has committed some of
    # them must neither store the rest twice nor count them twice.
    @event.listens_for(migrated_engine, "connect")
    def no_squashing(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.client.command("SET min_insert_block_size_rows = 0")
        dbapi_connection.client.command("SET min_insert_block_size_bytes = 0")

    migrated_engine.dispose()
    repository = TraceRepository(migrated_engine)
    repository.add_many([make_trace(9_999)])  # the schema check is out of the way
    batch = [make_trace(i, request_json="x" * 20_000) for i in range(3_000)]  # ~60 MB
    retrying = threading.local()
    looked_up = StoredTraces.identities

    def lookup_once_something_landed(self: StoredTraces, keys: BatchKeys) -> set[tuple[str, str]]:
        if getattr(retrying, "now", False):
            deadline = time.monotonic() + 60
            while stored_rows(migrated_engine) == 1 and time.monotonic() < deadline:
                time.sleep(0.002)
        return looked_up(self, keys)

    def retry() -> int:
        retrying.now = True
        return repository.add_many(batch)

    monkeypatch.setattr(StoredTraces, "identities", lookup_once_something_landed)
    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(retry)
        first = pool.submit(repository.add_many, batch)
        returned = [first.result(), second.result()]
    assert stored_rows(migrated_engine) == 3_001, returned
    assert sum(returned) == 3_000, returned


def test_an_unencodable_string_is_a_validation_error_and_nothing_is_written(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    batch = [make_trace(i).model_dump() for i in range(20)]
    batch[15]["agent_id"] = "bad\ud800decode"
    batch[17]["agent_tags"] = ["ok", "\udfff"]
    with pytest.raises(TraceValidationError) as caught:
        repository.add_many(batch, batch_size=10)
    assert {(index, field) for index, field, _ in caught.value.problems} == {(15, "agent_id"), (17, "agent_tags")}
    assert "lone surrogate" in str(caught.value)
    assert stored_rows(migrated_engine) == 0


def test_a_copied_trace_with_a_blank_organization_is_refused(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    # model_copy(update=...) skips validation: add_many still refuses a trace no read could reach.
    batch = [make_trace(1), make_trace(2).model_copy(update={"organization_id": " "})]
    with pytest.raises(TraceValidationError, match="item 1, organization_id"):
        repository.add_many(batch)
    assert stored_rows(migrated_engine) == 0


def test_a_batch_may_span_thousands_of_organizations_and_agents(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    # What a shared writer in a multi-tenant service sends: keys as literals in the query text exceeded
    # ClickHouse's max_query_size here. 10,000 traces over ~1,500 organizations and ~9,000 agents.
    batch = list(
        synthetic_traces(10_000, organizations=3_000, agents_per_organization=13, skew=1.1, payload_bytes=(10, 50))
    )
    assert len({trace.organization_id for trace in batch}) > 1_000
    assert len({trace.agent_id for trace in batch}) > 5_000
    assert repository.add_many(batch[:6_000]) == 6_000
    assert repository.add_many(batch) == 4_000  # the lookup finds the 6,000 stored ones among 10,000 keys
    assert repository.add_many(batch, skip_stored=False) == 0
    expected = {(trace.organization_id, trace.id) for trace in batch}
    assert lookup(migrated_engine, batch, staging=True) == lookup(migrated_engine, batch, staging=False) == expected
    assert stored_rows(migrated_engine) == 10_000


def test_a_session_that_loses_the_staging_table_falls_back_to_chunks(
    repository: TraceRepository, migrated_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # Behind a load balancer without sticky sessions, the next request of a session may reach a server that
    # never saw its temporary table: ClickHouse answers UNKNOWN_TABLE. Dropping the table between two lookups
    # gives the same answer; the lookup must go on, through chunks of identities, and say so once.
    repository.add_many([make_trace(i) for i in range(0, 40, 2)])
    batch = [make_trace(i) for i in range(40)]
    expected = {("org-1", make_trace(i).id) for i in range(0, 40, 2)}
    with migrated_engine.connect() as connection:
        client = driver_client(connection)
        stored = StoredTraces(client)
        assert stored.identities(BatchKeys.from_columns(insert_column_data(batch))) == expected
        client.command(f"DROP TEMPORARY TABLE {STAGING_TABLE}")
        with caplog.at_level(logging.WARNING, logger="llmtrace.stored_lookup"):
            for _ in range(2):
                assert stored.identities(BatchKeys.from_columns(insert_column_data(batch))) == expected
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "temporary tables are unavailable" in warnings[0]


def test_batches_after_an_overlapping_one_are_looked_up_without_the_probe(
    repository: TraceRepository, migrated_engine: Engine
) -> None:
    # After the probe finds possible copies, the next PROBE_PAUSE batches go straight to the lookup: whatever
    # the batches hold, the counts must stay exact, on both sides of the pause.
    repository.add_many([make_trace(i) for i in range(0, 240, 2)])
    batches = 12  # more than one pause
    assert batches - 1 > PROBE_PAUSE
    assert repository.add_many([make_trace(i) for i in range(360)], batch_size=30) == 360 - 120
    assert stored_rows(migrated_engine) == 360


@pytest.mark.parametrize("away_for", [0.15, None], ids=["brief outage", "long outage"])
def test_an_insert_whose_storing_cannot_be_read_back_says_so(
    repository: TraceRepository, migrated_engine: Engine, monkeypatch: pytest.MonkeyPatch, away_for: float | None
) -> None:
    # The table goes away right after the insert lands (a real failure of the reads that confirm it). A short
    # outage is waited out; a long one must not read as "nothing was written".
    repository.add(make_trace(999))  # the schema check is out of the way
    inserted = ingest.insert_as_one_block

    def insert_then_lose_the_table(*args: Any) -> None:
        inserted(*args)
        with migrated_engine.connect() as connection:
            connection.execute(text("RENAME TABLE llm_traces TO llm_traces_away"))
        if away_for is not None:
            threading.Timer(away_for, bring_back).start()

    def bring_back() -> None:
        with migrated_engine.connect() as connection:
            connection.execute(text("RENAME TABLE llm_traces_away TO llm_traces"))

    monkeypatch.setattr(ingest, "insert_as_one_block", insert_then_lose_the_table)
    batch = [make_trace(i) for i in range(40)]
    if away_for is not None:
        assert repository.add_many(batch) == 40
    else:
        with pytest.raises(
            WriteUnconfirmed, match=r"40 trace\(s\) were sent to ClickHouse and may be stored"
        ) as caught:
            repository.add_many(batch)
        assert caught.value.transient
        bring_back()
        monkeypatch.setattr(ingest, "insert_as_one_block", inserted)
        assert repository.add_many(batch) == 0  # sending it again settles it: stored once, by the first attempt
    assert stored_rows(migrated_engine) == 41
