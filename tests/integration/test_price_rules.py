"""Which price applies, pinned on the per-trace cost and on every source of a report.

Your prices win from the first one on, over every default of the same provider and model, later defaults
included; a deleted price of yours counts for nothing; another provider's model of the same name keeps its own
defaults; a price of yours and a default from the same hour: yours. Also: a BYOK trace whose counts contradict its
provider's convention is unpriced, not in ``byok_cost``."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine

from llmtrace import ALL_ORGANIZATIONS, TraceRepository
from llmtrace.cost import dollars, select_with_cost
from llmtrace.prices import ModelPrice, delete_price, set_price
from llmtrace.record import TRACES_TABLE
from tests.factories import make_trace


def day(month: int, dom: int) -> datetime:
    return datetime(2025, month, dom, tzinfo=UTC)


def flat(provider: str, when: datetime, rate: int, source: str) -> ModelPrice:
    return ModelPrice.flat(provider, "m", input=str(rate), output="0", effective_from=when, source=source)


DEFAULT, USER = "genai-prices", "user"
# (provider, trace time) -> the price in force: USD per million input tokens, and each trace has a million.
EXPECTED = {
    ("p1", day(1, 10)): 1,  # default D0
    ("p1", day(1, 20)): 1,  # the user price of 15 January was deleted: still D0
    ("p1", day(2, 10)): 10,  # first user price U1
    ("p1", day(3, 10)): 10,  # D1 (1 March) starts after the first user price: U1 still wins
    ("p1", day(6, 10)): 20,  # second user price U2
    ("p1", day(7, 10)): 20,  # D3 (1 July) is after the first user price
    ("p2", day(4, 10)): 6,  # same model name, another provider without user prices: its own defaults
    ("p3", day(1, 10)): 70,  # a user price and a default from the same hour: the user's
}


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    engine = migrated_engine
    for when, rate in ((day(1, 1), 1), (day(3, 1), 2), (day(5, 1), 3), (day(7, 1), 4)):
        set_price(engine, flat("p1", when, rate, DEFAULT))
    set_price(engine, flat("p1", day(1, 15), 99, USER))
    assert delete_price(engine, "p1", "m", day(1, 15))
    set_price(engine, flat("p1", day(2, 1), 10, USER))
    set_price(engine, flat("p1", day(6, 1), 20, USER))
    set_price(engine, flat("p2", day(1, 1), 5, DEFAULT))
    set_price(engine, flat("p2", day(4, 1), 6, DEFAULT))
    set_price(engine, flat("p3", day(1, 1), 7, DEFAULT))
    set_price(engine, flat("p3", day(1, 1), 70, USER))
    repository = TraceRepository(engine)
    repository.add_many(
        [
            make_trace(
                index,
                provider=provider,
                model="m",
                prompt_tokens=1_000_000,
                completion_tokens=0,
                cached_input_tokens=None,
                is_byok=False,
                created_at=when.replace(hour=12),
            )
            for index, (provider, when) in enumerate(EXPECTED)
        ]
    )
    return repository


def test_each_trace_gets_the_price_the_rules_say(repository: TraceRepository) -> None:
    with repository.engine.connect() as connection:
        rows = connection.execute(select_with_cost(TRACES_TABLE.c.provider, TRACES_TABLE.c.created_at)).mappings().all()
    got = {(row["provider"], row["created_at"].replace(hour=0, tzinfo=UTC)): dollars(row["cost"]) for row in rows}
    assert got == {key: Decimal(rate) for key, rate in EXPECTED.items()}


@pytest.mark.parametrize(
    ("source", "percentiles"), list(itertools.product(("raw", "hourly", "daily"), (None, "approximate")))
)
def test_every_report_prices_by_the_same_rules(repository: TraceRepository, source: str, percentiles: str) -> None:
    rows = repository.usage(
        ALL_ORGANIZATIONS, group_by=("provider",), granularity="day", source=source, percentiles=percentiles
    )
    got = {(row.provider, row.bucket): row.cost for row in rows}
    assert got == {key: Decimal(rate) for key, rate in EXPECTED.items()}


def test_byok_traces_whose_counts_contradict_the_convention_are_unpriced_not_in_byok_cost(
    migrated_engine: Engine,
) -> None:
    repository = TraceRepository(migrated_engine)
    repository.add_many(
        [make_trace(0, provider="openai", model="gpt-4.1", is_byok=True, prompt_tokens=10, cached_input_tokens=50)]
    )
    for source in ("raw", "hourly", "daily"):
        (row,) = repository.usage(ALL_ORGANIZATIONS, group_by=(), source=source, percentiles=None)
        assert row.unpriced_requests == 1, source
        assert row.byok_cost == 0 and row.cost == 0, (source, row.byok_cost)
