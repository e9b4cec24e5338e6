"""Cost: ClickHouse's price of each trace and of each report against genai-prices' calc_price, price overrides,
unpriced traces, and the price list API."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot, types
from sqlalchemy import Engine

from llmtrace import ALL_ORGANIZATIONS, LLMTrace, TraceRepository
from llmtrace.cost import dollars, select_with_cost
from llmtrace.price_list import default_prices
from llmtrace.prices import (
    EARLIEST,
    ModelPrice,
    Tier,
    delete_price,
    list_prices,
    load_default_prices,
    price_unpriced_models,
    set_price,
    set_token_convention,
)
from llmtrace.record import TRACES_TABLE
from tests.factories import make_trace


def priced_by_time_of_day(provider_name: str, model_name: str) -> bool:
    """Whether genai-prices prices this name with peak/off-peak hours, which the price table does not represent."""
    providers = data_snapshot.get_snapshot().providers
    provider = data_snapshot.find_provider_by_id(providers, provider_name)
    model = provider.find_model(model_name, all_providers=providers) if provider else None
    return (
        model is not None
        and isinstance(model.prices, list)
        and any(isinstance(entry.constraint, types.TimeOfDateConstraint) for entry in model.prices)
    )


def genai_cost(trace: LLMTrace, *, prompt_includes_cached: bool, completion_includes_reasoning: bool) -> Decimal:
    """calc_price for the trace's counts, read with the convention the price row states (see llmtrace.cost)."""
    cached, written, reasoning = trace.cached_input_tokens, trace.cache_write_tokens, trace.reasoning_tokens
    input_tokens = trace.prompt_tokens + (0 if prompt_includes_cached else (cached or 0) + (written or 0))
    output_tokens = trace.completion_tokens + (0 if completion_includes_reasoning else reasoning or 0)
    usage = Usage(
        input_tokens=input_tokens,
        cache_read_tokens=cached,
        cache_write_tokens=written,
        output_tokens=output_tokens,
        output_reasoning_tokens=reasoning,
    )
    return calc_price(
        usage, trace.model, provider_id=trace.provider, genai_request_timestamp=trace.created_at
    ).total_price


def random_traces(count: int, seed: int) -> tuple[list[LLMTrace], dict[tuple[str, str], ModelPrice]]:
    """Traces over the default list's models and 4 years, with counts that reach every tier and convention."""
    rng = random.Random(seed)
    rows = [row for row in default_prices() if not priced_by_time_of_day(row.provider, row.model)]
    by_pair = {(row.provider, row.model): row for row in rows}
    pairs = sorted(by_pair)
    traces = []
    for index in range(count):
        provider, model = rng.choice(pairs)
        prompt = rng.choice([rng.randint(0, 4_000), rng.randint(0, 1_100_000), 0, 200_000, 200_001])
        cached = rng.choice([None, 0, rng.randint(0, prompt)])
        written = rng.choice([None, 0, rng.randint(0, prompt - (cached or 0))])
        completion = rng.randint(0, 8_000)
        reasoning = rng.choice([None, 0, rng.randint(0, completion)])
        created_at = datetime(2023, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 4 * 365 * 86_400))
        traces.append(
            make_trace(
                index,
                organization_id=f"org-{index % 7}",
                provider=provider,
                model=model,
                is_byok=rng.random() < 0.2,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                cached_input_tokens=cached,
                cache_write_tokens=written,
                reasoning_tokens=reasoning,
                created_at=created_at,
            )
        )
    return traces, by_pair


@pytest.fixture
def repository(migrated_engine: Engine) -> TraceRepository:
    return TraceRepository(migrated_engine)


def test_each_trace_and_each_report_cost_what_genai_prices_says(repository: TraceRepository) -> None:
    traces, prices = random_traces(3_000, seed=7)
    repository.add_many(traces)
    expected = {}
    for trace in traces:
        row = prices[(trace.provider, trace.model)]
        assert row.prompt_includes_cached is not None and row.completion_includes_reasoning is not None
        expected[trace.id] = genai_cost(
            trace,
            prompt_includes_cached=row.prompt_includes_cached,
            completion_includes_reasoning=row.completion_includes_reasoning,
        )
    with repository.engine.connect() as connection:
        rows = connection.execute(select_with_cost(TRACES_TABLE.c.id)).mappings().all()
    assert len(rows) == len(traces)
    assert all(row["priced"] for row in rows)
    mismatched = {row["id"]: (dollars(row["cost"]), expected[row["id"]]) for row in rows}
    mismatched = {key: pair for key, pair in mismatched.items() if pair[0] != pair[1]}
    assert not mismatched, list(mismatched.items())[:5]
    # Tiers and both conventions were exercised, not only the base rates.
    assert any(len(prices[(t.provider, t.model)].tiers) > 1 and t.prompt_tokens > 200_000 for t in traces)
    assert {row.prompt_includes_cached for row in prices.values()} == {True, False}

    # A report prices each day's (or hour's) totals; it equals the traces' own costs, platform-paid and BYOK apart,
    # from the traces and from both rollups.
    wanted: dict[tuple[Any, ...], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for trace in traces:
        day = trace.created_at.replace(hour=0, minute=0, second=0, microsecond=0)
        wanted[(day, trace.organization_id, trace.model)][trace.is_byok] += expected[trace.id]
    for source in ("raw", "daily", "hourly"):
        report = repository.usage(
            ALL_ORGANIZATIONS,
            group_by=("organization_id", "model"),
            granularity="day",
            percentiles="exact" if source == "raw" else "approximate",
            source=source,
        )
        got = {(r.bucket, r.organization_id, r.model): [r.cost, r.byok_cost] for r in report}
        assert got == dict(wanted), source
        for r in report:
            assert r.unpriced_requests == 0
            parts = (r.input_cost, r.cached_input_cost, r.cache_write_cost, r.output_cost, r.reasoning_cost)
            assert r.cost == sum(parts, start=r.request_cost)


def test_traces_without_a_price_are_counted_never_free(repository: TraceRepository) -> None:
    repository.add_many(
        [
            make_trace(0, provider="openai", model="gpt-4.1", prompt_tokens=100, completion_tokens=10),
            make_trace(1, provider="openai", model="no-such-model", prompt_tokens=100, completion_tokens=10),
            make_trace(2, provider="", model="gpt-4.1", prompt_tokens=100, completion_tokens=10),
            # Cache reads above a prompt that should include them: a contradiction, not a price.
            make_trace(3, provider="openai", model="gpt-4.1", prompt_tokens=10, cached_input_tokens=50),
            make_trace(4, provider="openai", model="gpt-4.1", completion_tokens=5, reasoning_tokens=9),
        ]
    )
    (row,) = repository.usage(ALL_ORGANIZATIONS, group_by=())
    assert row.requests == 5 and row.unpriced_requests == 4
    only_priced = make_trace(0, provider="openai", model="gpt-4.1", prompt_tokens=100, completion_tokens=10)
    assert row.cost + row.byok_cost == genai_cost(
        only_priced, prompt_includes_cached=True, completion_includes_reasoning=True
    )


def test_a_user_price_applies_from_its_hour_on_and_wins_over_later_defaults(repository: TraceRepository) -> None:
    start = datetime(2025, 6, 1, 12, tzinfo=UTC)
    times = [start - timedelta(microseconds=1), start, datetime(2026, 10, 1, tzinfo=UTC)]
    traces = [
        make_trace(
            i,
            provider="openai",
            model="gpt-4.1",
            prompt_tokens=1_000_000,
            completion_tokens=0,
            cached_input_tokens=None,
            created_at=t,
        )
        for i, t in enumerate(times)
    ]
    repository.add_many(traces)
    default = list_prices(repository.engine, provider="openai", model="gpt-4.1")
    assert default and all(p.source == "genai-prices" for p in default)
    by_default = [genai_cost(t, prompt_includes_cached=True, completion_includes_reasoning=True) for t in traces]
    # A default price that starts after the user's must not take over from it.
    later_default = ModelPrice.flat(
        "openai",
        "gpt-4.1",
        input="99",
        output="99",
        effective_from=datetime(2026, 1, 1, tzinfo=UTC),
        source="genai-prices",
    )
    set_price(repository.engine, later_default)
    set_price(repository.engine, ModelPrice.flat("openai", "gpt-4.1", input="1.5", output="3", effective_from=start))

    def costs() -> list[Decimal]:
        rows = repository.usage(ALL_ORGANIZATIONS, group_by=(), granularity="hour")
        return [row.cost + row.byok_cost for row in rows]

    assert costs() == [by_default[0], Decimal("1.5"), Decimal("1.5")]
    assert delete_price(repository.engine, "openai", "gpt-4.1", start)
    assert not delete_price(repository.engine, "openai", "gpt-4.1", start)
    assert costs() == [*by_default[:2], Decimal(99)]
    assert load_default_prices(repository.engine) == len(default_prices())
    assert costs() == by_default  # the refresh removed the default row the list does not have


def test_token_conventions_are_data(repository: TraceRepository) -> None:
    trace = make_trace(0, provider="openai", model="gpt-4.1", prompt_tokens=1_000, cached_input_tokens=400)
    repository.add_many([trace])
    (first,) = repository.usage(ALL_ORGANIZATIONS, group_by=())
    assert first.cost + first.byok_cost == genai_cost(
        trace, prompt_includes_cached=True, completion_includes_reasoning=True
    )
    assert set_token_convention(repository.engine, "openai", prompt_includes_cached=False) > 0
    (second,) = repository.usage(ALL_ORGANIZATIONS, group_by=())
    assert second.cost + second.byok_cost == genai_cost(
        trace, prompt_includes_cached=False, completion_includes_reasoning=True
    )
    assert second.cost + second.byok_cost > first.cost + first.byok_cost
    with pytest.raises(ValueError, match="prompt_includes_cached or completion_includes_reasoning"):
        set_token_convention(repository.engine, "openai")


def test_names_the_default_list_lacks_are_priced_as_genai_prices_resolves_them(repository: TraceRepository) -> None:
    dated = make_trace(
        0, provider="anthropic", model="claude-sonnet-4-20250514", prompt_tokens=5_000, completion_tokens=100
    )
    unknown = make_trace(1, provider="openai", model="house-model-7", prompt_tokens=5_000)
    repository.add_many([dated, unknown])
    (before,) = repository.usage(ALL_ORGANIZATIONS, group_by=())
    assert before.unpriced_requests == 2
    report = price_unpriced_models(repository.engine)
    assert report.priced == [("anthropic", "claude-sonnet-4-20250514")]
    assert report.still_unpriced == [("openai", "house-model-7")]
    (after,) = repository.usage(ALL_ORGANIZATIONS, group_by=())
    assert after.unpriced_requests == 1
    assert after.cost + after.byok_cost == genai_cost(
        dated, prompt_includes_cached=False, completion_includes_reasoning=True
    )
    assert price_unpriced_models(repository.engine).priced == []
    # A name whose only price was deleted has no price again, and is reported as such.
    house = ModelPrice.flat(
        "openai", "house-model-7", input="1", output="2", effective_from=datetime(2020, 1, 1, tzinfo=UTC)
    )
    set_price(repository.engine, house)
    assert price_unpriced_models(repository.engine).still_unpriced == []
    assert delete_price(repository.engine, "openai", "house-model-7", house.effective_from)
    assert price_unpriced_models(repository.engine).still_unpriced == [("openai", "house-model-7")]


def test_prices_round_trip_and_bad_prices_name_the_field(repository: TraceRepository) -> None:
    tiered = ModelPrice(
        provider="self-hosted",
        model="llama-70b",
        effective_from=datetime(2026, 3, 1, 7, tzinfo=UTC),
        tiers=(
            Tier(None, Decimal("0.2"), Decimal("0.02"), Decimal("0.25"), Decimal("0.8"), Decimal("0.8")),
            Tier(
                128_000,
                Decimal("0.4"),
                Decimal("0.04"),
                Decimal("0.5"),
                Decimal("1.6"),
                Decimal("1.6"),
                Decimal("0.000000000000000001"),
            ),
        ),
    )
    set_price(repository.engine, tiered)
    assert list_prices(repository.engine, provider="self-hosted") == [tiered]
    hour = datetime(2026, 3, 1, 7, 30, tzinfo=UTC)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"effective_from": hour}, "not a whole UTC hour"),
        ({"effective_from": datetime(2026, 3, 1)}, "timezone-aware"),
        ({"currency": "EUR"}, "currency"),
        ({"provider": " "}, "provider"),
        ({"tiers": ()}, "at least one Tier"),
        ({"tiers": (tiered.tiers[1],)}, "base rates"),
        ({"tiers": (tiered.tiers[0], tiered.tiers[1], tiered.tiers[1])}, "increase strictly"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ModelPrice(**{**tiered.__dict__, "updated_at": None, **change})
    with pytest.raises(ValueError, match="above_input_tokens: 150000 is not a supported tier threshold"):
        Tier(150_000, Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(1))
    with pytest.raises(ValueError, match="input: expected a finite non-negative Decimal"):
        Tier(None, Decimal(-1), Decimal(1), Decimal(1), Decimal(1), Decimal(1))
    with pytest.raises(ValueError, match="more than 18 decimal places"):
        Tier(None, Decimal("1e-19"), Decimal(1), Decimal(1), Decimal(1), Decimal(1))
    assert ModelPrice.flat("x", "y", input="1", output="2").effective_from == EARLIEST
