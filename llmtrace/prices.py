"""Model prices: the versioned ``llm_model_prices`` table, and the API to read and change it.

Prices are data, never code: a trace keeps its raw token counts, and its cost is computed when a report is run
from the price in force at the trace's ``created_at`` (:mod:`llmtrace.cost`). Changing a price re-prices
history; no trace is ever rewritten.

Each row is one model's price from ``effective_from`` on, for the traces that name that ``provider`` and
``model`` exactly. Two sources of rows live side by side:

- ``genai-prices``: the default list (:mod:`llmtrace.price_list`), loaded by the migration that creates the
  table and refreshed by :func:`load_default_prices`;
- ``user``: your own prices (negotiated rates, self-hosted models, corrections), set with :func:`set_price`.
  A user price applies from its ``effective_from`` on and takes precedence over every default price from then
  on, including later ones; before it, the default list applies.

The table is a ReplacingMergeTree keyed by (provider, model, source, effective_from): setting a price for the
same key again replaces it, and :func:`delete_price` marks it deleted. Readers use ``FINAL``.

Two rules keep the rollups exact (a report computed from them prices each hour's or day's totals at once):
``effective_from`` is a whole UTC hour, and tier thresholds come from :data:`TIER_THRESHOLDS`. A price that takes
effect inside a day (not at midnight UTC) makes reports over that day price hours, and not read the daily
rollup (:func:`prices_change_inside_days`).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse_connect.cc_sqlalchemy.datatypes.sqltypes import (
    Array,
    Bool,
    DateTime64,
    Int64,
    LowCardinality,
    String,
    UInt8,
)
from clickhouse_connect.cc_sqlalchemy.datatypes.sqltypes import Decimal as ClickHouseDecimal
from clickhouse_connect.cc_sqlalchemy.ddl.tableengine import ReplacingMergeTree
from sqlalchemy import Column, Connection, Engine, Table, func, select

from llmtrace.engine import driver_client
from llmtrace.errors import database_errors
from llmtrace.model import MICROS_PER_DAY, as_utc
from llmtrace.record import Base

PRICES_TABLE_NAME = "llm_model_prices"
USER_SOURCE = "user"
CURRENCY = "USD"
# Prices per million tokens are stored as Decimal(38, 18): genai-prices has rates with 18 decimal places, and a
# token count times a rate (up to 10^20 before the point) fits any realistic report.
PRICE_SCALE = 18
PRICE_TYPE = f"Decimal(38, {PRICE_SCALE})"
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)  # created_at's lowest value
LATEST = datetime(2299, 12, 31, 23, tzinfo=UTC)
# Input-token thresholds a tiered price may use (a tier applies to the whole request once its input passes the
# threshold). The hourly rollup counts each hour's traces by how many of these thresholds their input passes,
# so a tier on any of them is priced exactly there; each threshold splits the rollup's rows, so the list holds
# those genai-prices uses and the common context sizes above them, nothing below 32k.
TIER_THRESHOLDS = (
    32_000,
    100_000,
    128_000,
    199_999,
    200_000,
    256_000,
    272_000,
    512_000,
    524_288,
    1_000_000,
    1_048_576,
)
# How a provider's API counts tokens, for the providers whose count differs from the usual one (the prompt
# count includes cache reads and writes; the completion count includes reasoning). The defaults of a price row;
# change them per provider with set_token_convention() when your writer records counts normalized otherwise.
CACHE_OUTSIDE_PROMPT = frozenset({"anthropic"})  # Anthropic's input_tokens excludes cache reads and writes
REASONING_OUTSIDE_COMPLETION = frozenset({"google", "google_ai", "google_vertex", "vertex_ai", "gemini"})

RATE_COLUMNS = (
    "input_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "output_per_mtok",
    "reasoning_per_mtok",
    "per_thousand_requests",
)
PRICE_KEY = ("provider", "model", "source", "effective_from")


def _rates() -> Array:
    return Array(ClickHouseDecimal(38, PRICE_SCALE))


PRICES_TABLE = Table(
    PRICES_TABLE_NAME,
    Base.metadata,
    Column("provider", LowCardinality(String)),
    Column("model", String),
    Column("source", LowCardinality(String)),
    Column("effective_from", DateTime64(6, "UTC")),
    Column("currency", LowCardinality(String)),
    Column("prompt_includes_cached", Bool),
    Column("completion_includes_reasoning", Bool),
    Column("tier_above", Array(Int64)),
    *(Column(name, _rates()) for name in RATE_COLUMNS),
    Column("updated_at", DateTime64(6, "UTC")),
    Column("is_deleted", UInt8),
    ReplacingMergeTree(version="updated_at", is_deleted="is_deleted", order_by=PRICE_KEY),
)


@dataclass(frozen=True)
class Tier:
    """The rates of a price for requests whose input is above ``above_input_tokens`` (``None``: the base rates).

    Rates are USD per million tokens (``per_thousand_requests``: USD per thousand requests, a fixed fee).
    ``cached_input`` applies to cache reads, ``cache_write`` to tokens written to the cache, ``reasoning`` to
    reasoning tokens; give them the input or output rate when the provider does not price them apart.
    """

    above_input_tokens: int | None
    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal
    per_thousand_requests: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        above = self.above_input_tokens
        if above is not None and (type(above) is not int or above not in TIER_THRESHOLDS):
            raise ValueError(
                f"above_input_tokens: {above!r} is not a supported tier threshold; use None for the base rates or "
                f"one of {', '.join(map(str, TIER_THRESHOLDS))}"
            )
        for name in ("input", "cached_input", "cache_write", "output", "reasoning", "per_thousand_requests"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"{name}: expected a finite non-negative Decimal, got {value!r}")
            exponent = value.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -PRICE_SCALE:
                raise ValueError(f"{name}: {value} has more than {PRICE_SCALE} decimal places")
            if value >= Decimal(10) ** (38 - PRICE_SCALE - 6):
                raise ValueError(f"{name}: {value} is too large for a price")


@dataclass(frozen=True)
class ModelPrice:
    """One model's price from ``effective_from`` on.

    Attributes:
        provider: The provider name exactly as traces record it (``trace.provider``).
        model: The model name exactly as traces record it (``trace.model``).
        effective_from: When the price starts to apply: a whole UTC hour (aware datetime).
        tiers: The base rates first (``above_input_tokens=None``), then any higher tiers in increasing order.
        prompt_includes_cached: Whether the trace's ``prompt_tokens`` already includes its cache reads and
            writes (the usual convention) or counts them apart (Anthropic's API). ``None``: the provider's default.
        completion_includes_reasoning: Whether ``completion_tokens`` includes ``reasoning_tokens`` (the usual
            convention) or not (Gemini's API). ``None``: the provider's default.
        source: ``"user"`` for your prices; ``"genai-prices"`` for the default list.
        currency: Only ``"USD"``: reports add costs up, so every price is in one currency.
    """

    provider: str
    model: str
    effective_from: datetime
    tiers: tuple[Tier, ...]
    prompt_includes_cached: bool | None = None
    completion_includes_reasoning: bool | None = None
    source: str = USER_SOURCE
    currency: str = CURRENCY
    updated_at: datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("provider", "model", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if self.currency != CURRENCY:
            raise ValueError(f"currency: only {CURRENCY!r} is supported (reports add costs up), got {self.currency!r}")
        _check_effective_from(self.effective_from)
        tiers = tuple(self.tiers)
        if not tiers or not all(isinstance(tier, Tier) for tier in tiers):
            raise ValueError("tiers: expected at least one Tier, the base rates first")
        if tiers[0].above_input_tokens is not None:
            raise ValueError("tiers: the first tier holds the base rates, so its above_input_tokens must be None")
        thresholds = [tier.above_input_tokens for tier in tiers[1:]]
        if any(t is None for t in thresholds) or thresholds != sorted(set(thresholds)):  # type: ignore[type-var]
            raise ValueError("tiers: after the base rates, above_input_tokens must increase strictly")
        object.__setattr__(self, "tiers", tiers)
        if self.prompt_includes_cached is None:
            object.__setattr__(self, "prompt_includes_cached", self.provider not in CACHE_OUTSIDE_PROMPT)
        if self.completion_includes_reasoning is None:
            object.__setattr__(self, "completion_includes_reasoning", self.provider not in REASONING_OUTSIDE_COMPLETION)

    @classmethod
    def flat(
        cls,
        provider: str,
        model: str,
        *,
        input: Decimal | str,
        output: Decimal | str,
        cached_input: Decimal | str | None = None,
        cache_write: Decimal | str | None = None,
        reasoning: Decimal | str | None = None,
        effective_from: datetime = EARLIEST,
        **options: Any,
    ) -> ModelPrice:
        """A price without tiers, per million tokens; cache reads and writes default to the input rate and
        reasoning to the output rate."""
        rate_in, rate_out = Decimal(input), Decimal(output)
        tier = Tier(
            above_input_tokens=None,
            input=rate_in,
            cached_input=rate_in if cached_input is None else Decimal(cached_input),
            cache_write=rate_in if cache_write is None else Decimal(cache_write),
            output=rate_out,
            reasoning=rate_out if reasoning is None else Decimal(reasoning),
        )
        return cls(provider=provider, model=model, effective_from=effective_from, tiers=(tier,), **options)


def _check_effective_from(value: Any) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"effective_from: expected a timezone-aware datetime, got {value!r}")
    utc = value.astimezone(UTC)
    if (utc.minute, utc.second, utc.microsecond) != (0, 0, 0):
        raise ValueError(
            f"effective_from: {value.isoformat()} is not a whole UTC hour; prices change on the hour "
            f"(use {utc.replace(minute=0, second=0, microsecond=0).isoformat()})"
        )
    if not EARLIEST <= utc <= LATEST:
        raise ValueError(f"effective_from: {value.isoformat()} is outside {EARLIEST.year}..{LATEST.year}")


# -- reading and writing ----------------------------------------------------------------------------------------


def set_price(engine: Engine, price: ModelPrice) -> None:
    """Store ``price`` (replacing a price with the same provider, model, source and effective_from)."""
    set_prices(engine, [price])


def set_prices(engine: Engine | Connection, prices: Iterable[ModelPrice]) -> int:
    """Store several prices in one insert; returns how many. Nothing is stored if any is invalid."""
    rows = [_row(price) for price in prices]
    _insert(engine, rows, "storing prices")
    return len(rows)


def _insert(bind: Engine | Connection, rows: list[dict[str, Any]], doing: str) -> None:
    if not rows:
        return
    names = list(rows[0])
    # The driver's column-oriented insert: several times faster than executemany for the default list's rows.
    with database_errors(doing), _connection(bind) as connection:
        driver_client(connection).insert(PRICES_TABLE_NAME, [list(row.values()) for row in rows], column_names=names)


@contextmanager
def _connection(bind: Engine | Connection) -> Iterator[Connection]:
    """A connection for ``bind``: the one given (a migration's), or a new one of the engine."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.connect() as connection:
            yield connection


def delete_price(
    engine: Engine, provider: str, model: str, effective_from: datetime, *, source: str = USER_SOURCE
) -> bool:
    """Remove one price; returns whether it existed. Traces it priced fall back to the price in force without it."""
    existing = [
        price
        for price in list_prices(engine, provider=provider, model=model, source=source)
        if price.effective_from == effective_from.astimezone(UTC)
    ]
    if existing:
        row = _row(replace(existing[0], updated_at=datetime.now(UTC)))
        row["is_deleted"] = 1
        _insert(engine, [row], "deleting a price")
    return bool(existing)


def list_prices(
    engine: Engine | Connection, *, provider: str | None = None, model: str | None = None, source: str | None = None
) -> builtins.list[ModelPrice]:
    """The prices in the table (deleted ones left out), ordered by provider, model, source and effective_from."""
    from clickhouse_connect.cc_sqlalchemy.sql import final

    statement = final(select(PRICES_TABLE)).where(PRICES_TABLE.c.is_deleted == 0)
    for name, value in (("provider", provider), ("model", model), ("source", source)):
        if value is not None:
            statement = statement.where(PRICES_TABLE.c[name] == value)
    statement = statement.order_by(
        *(PRICES_TABLE.c[name] for name in ("provider", "model", "source", "effective_from"))
    )
    with database_errors("reading prices"), _connection(engine) as connection:
        rows = connection.execute(statement).mappings().all()
    return [_price(row) for row in rows]


def prices_change_inside_days(connection: Connection, since: datetime | None, until: datetime | None) -> bool:
    """Whether a price (of either source, deleted ones left out) takes effect at another time than midnight UTC
    within the days from ``since``'s to ``until`` (``None``: unbounded).

    Default prices change on dates, so this is usually false: a report can then price each day's totals at
    once, and read the daily rollup (see llmtrace.usage).
    """
    from clickhouse_connect.cc_sqlalchemy.sql import final

    p = PRICES_TABLE.c
    micros = func.toUnixTimestamp64Micro(p.effective_from)
    statement = (
        final(select(func.count()).select_from(PRICES_TABLE))
        .where(p.is_deleted == 0)
        .where(func.positiveModulo(micros, MICROS_PER_DAY) != 0)
    )
    if since is not None:
        day = as_utc(since).replace(hour=0, minute=0, second=0, microsecond=0)
        statement = statement.where(p.effective_from > day)
    if until is not None:
        statement = statement.where(p.effective_from < until)
    return bool(connection.execute(statement).scalar_one())


def load_default_prices(engine: Engine | Connection) -> int:
    """Bring the default (genai-prices) rows up to the installed genai-prices; returns how many rows it has.

    Rows the installed list no longer has are marked deleted; your own prices are left alone.
    """
    from llmtrace.price_list import SOURCE, default_prices

    fresh = {_key(price): price for price in default_prices()}
    stale = [price for price in list_prices(engine, source=SOURCE) if _key(price) not in fresh]
    now = datetime.now(UTC)
    rows = [_row(replace(price, updated_at=now)) for price in fresh.values()]
    for price in stale:
        row = _row(replace(price, updated_at=now))
        row["is_deleted"] = 1
        rows.append(row)
    _insert(engine, rows, "loading the default prices")
    return len(fresh)


def default_prices_sql(table: str = PRICES_TABLE_NAME, rows_per_statement: int = 200) -> list[str]:
    """``INSERT`` statements of the default list with literal values, for migration scripts rendered offline.

    Several statements of a few hundred rows each: ClickHouse parses a query of at most ``max_query_size``
    bytes (256 KiB by default) before its data. The rows' version is the earliest time, so the script renders
    the same each time and any later write (a refresh, your own price) replaces them.
    """
    from llmtrace.price_list import default_prices

    rows = [_row(replace(price, updated_at=EARLIEST)) for price in default_prices()]
    statements = []
    for start in range(0, len(rows), rows_per_statement):
        chunk = rows[start : start + rows_per_statement]
        values = ",\n".join("(" + ", ".join(_literal(value) for value in row.values()) + ")" for row in chunk)
        statements.append(f"INSERT INTO {table} ({', '.join(rows[0])}) VALUES\n{values}")
    return statements


def _literal(value: Any) -> str:
    """A ClickHouse literal for the value types of a price row.

    Written here because clickhouse-connect's ``format_query_value`` drops a datetime's microseconds and writes
    small Decimals in exponent form (``1E-18``), which ClickHouse reads as a Float64, not exactly.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return "'" + value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def set_token_convention(
    engine: Engine,
    provider: str,
    *,
    prompt_includes_cached: bool | None = None,
    completion_includes_reasoning: bool | None = None,
) -> int:
    """Say how the traces of ``provider`` count tokens, on every price row of that provider; returns the rows changed.

    Use it when your writer records counts differently from the provider's API default (see
    :class:`ModelPrice`). Reports re-price at once; rows the default list adds later get the provider default.
    """
    changes = {
        name: value
        for name, value in (
            ("prompt_includes_cached", prompt_includes_cached),
            ("completion_includes_reasoning", completion_includes_reasoning),
        )
        if value is not None
    }
    for name, value in changes.items():
        if type(value) is not bool:
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if not changes:
        raise ValueError("give prompt_includes_cached or completion_includes_reasoning (or both)")
    now = datetime.now(UTC)
    updated = [
        replace(
            price,
            updated_at=now,
            prompt_includes_cached=changes.get("prompt_includes_cached", price.prompt_includes_cached),
            completion_includes_reasoning=changes.get(
                "completion_includes_reasoning", price.completion_includes_reasoning
            ),
        )
        for price in list_prices(engine, provider=provider)
    ]
    set_prices(engine, updated)
    return len(updated)


def _key(price: ModelPrice) -> tuple[str, str, str, datetime]:
    return price.provider, price.model, price.source, price.effective_from.astimezone(UTC)


def _row(price: ModelPrice) -> dict[str, Any]:
    row: dict[str, Any] = {
        "provider": price.provider,
        "model": price.model,
        "source": price.source,
        "effective_from": price.effective_from.astimezone(UTC),
        "currency": price.currency,
        "prompt_includes_cached": price.prompt_includes_cached,
        "completion_includes_reasoning": price.completion_includes_reasoning,
        # The base rates apply to any request: above -1 input tokens.
        "tier_above": [-1 if tier.above_input_tokens is None else tier.above_input_tokens for tier in price.tiers],
        "updated_at": price.updated_at or datetime.now(UTC),
        "is_deleted": 0,
    }
    for column, attribute in zip(RATE_COLUMNS, _TIER_ATTRIBUTES, strict=True):
        row[column] = [getattr(tier, attribute) for tier in price.tiers]
    return row


_TIER_ATTRIBUTES = ("input", "cached_input", "cache_write", "output", "reasoning", "per_thousand_requests")


def _price(row: Any) -> ModelPrice:
    tiers = tuple(
        Tier(
            above_input_tokens=None if above < 0 else above,
            **{
                attribute: Decimal(row[column][position])
                for column, attribute in zip(RATE_COLUMNS, _TIER_ATTRIBUTES, strict=True)
            },
        )
        for position, above in enumerate(row["tier_above"])
    )
    return ModelPrice(
        provider=row["provider"],
        model=row["model"],
        effective_from=as_utc(row["effective_from"]),
        tiers=tiers,
        prompt_includes_cached=bool(row["prompt_includes_cached"]),
        completion_includes_reasoning=bool(row["completion_includes_reasoning"]),
        source=row["source"],
        currency=row["currency"],
        updated_at=as_utc(row["updated_at"]),
    )


def price_unpriced_models(engine: Engine, *, since: datetime | None = None) -> PricingReport:
    """Add default prices for the (provider, model) names traces use that have no price yet.

    The default list holds each model under its id and exact aliases; traces often name a model otherwise (a
    dated variant, another provider name for the same API). For each such name in ``llm_traces`` (created at or
    after ``since``, if given) this asks genai-prices, as its ``calc_price`` would resolve that name, and stores
    the rows it gives (source ``genai-prices``). Run it after new models appear, or on a schedule; reports
    count the traces still unpriced (``UsageRow.unpriced_requests``).
    """
    from clickhouse_connect.cc_sqlalchemy.sql import final

    from llmtrace.price_list import genai_price_rows
    from llmtrace.record import TRACES_TABLE

    t = TRACES_TABLE.c
    used = select(t.provider, t.model).distinct()
    if since is not None:
        used = used.where(t.created_at >= since)
    p = PRICES_TABLE.c
    # Read apart, as a top-level query: FINAL is lost in a subquery, and a price deleted but not yet merged away
    # would otherwise still count.
    priced = final(select(p.provider, p.model).distinct()).where(p.is_deleted == 0)
    with database_errors("finding unpriced models"), engine.connect() as connection:
        known = {(row[0], row[1]) for row in connection.execute(priced)}
        pairs = [(row[0], row[1]) for row in connection.execute(used) if (row[0], row[1]) not in known]
    added: list[tuple[str, str]] = []
    rows: list[ModelPrice] = []
    for provider, model in sorted(pairs):
        found = genai_price_rows(provider, model)
        if found:
            added.append((provider, model))
            rows.extend(found)
    set_prices(engine, rows)
    return PricingReport(priced=added, still_unpriced=[pair for pair in sorted(pairs) if pair not in set(added)])


@dataclass(frozen=True)
class PricingReport:
    """What :func:`price_unpriced_models` did: the (provider, model) names it priced, and those genai-prices
    does not know (give them a price with :func:`set_price`)."""

    priced: builtins.list[tuple[str, str]]
    still_unpriced: builtins.list[tuple[str, str]]
