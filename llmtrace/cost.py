"""Cost in SQL: how a trace's token counts become billable tokens, and what they cost at the price in force.

Everything here is a SQLAlchemy expression that ClickHouse evaluates, so costs are computed where the traces
are, over any number of them, from the price list (:mod:`llmtrace.prices`) as it is when the query runs.

Which price applies. A trace (or an hour's traces) is joined to the price rows of its exact ``provider`` and
``model`` with an ``ASOF LEFT JOIN``: the row with the latest ``effective_from`` at or before its time. Your own
prices (source ``user``) win from the first one on, over the default list (see :func:`price_rows`). No row: the
trace is *unpriced*, counted as such and never priced at 0.

Billable tokens, for a price row that says how its provider counts (``prompt_includes_cached``,
``completion_includes_reasoning``):

=================== ============================================== =============================================
billed as           prompt includes cache reads/writes (usual)     prompt counts them apart (Anthropic's API)
=================== ============================================== =============================================
input               prompt - cached_input - cache_write            prompt
cached input        cached_input                                   cached_input
cache write         cache_write                                    cache_write
(tier is chosen by) prompt                                         prompt + cached_input + cache_write
=================== ============================================== =============================================

=================== ============================================== =============================================
billed as           completion includes reasoning (usual)          completion excludes it (Gemini's API)
=================== ============================================== =============================================
output              completion - reasoning                         completion
reasoning           reasoning                                      reasoning
=================== ============================================== =============================================

Counts a trace did not report (``None``) count as 0. A trace whose counts contradict its convention (cache
reads and writes above a prompt that should include them, reasoning above a completion that should include it)
is unpriced rather than priced at a guess. A tiered price applies the rate of the highest tier whose threshold
the input (as in the table) exceeds to all of the request's tokens, as genai-prices does; a fixed fee per
thousand requests is added per trace. These are the quantities genai-prices' ``calc_price`` prices for
``Usage(input_tokens=<input incl. cache>, cache_read_tokens=cached_input, cache_write_tokens=cache_write,
output_tokens=<output incl. reasoning>, output_reasoning_tokens=reasoning)``.

Amounts come out of ClickHouse in millionths of a dollar (a Decimal(38, 18) sum of tokens times the rate per
million) and are scaled to dollars exactly in Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import Any

from sqlalchemy import Integer, Select, and_, case, column, func, literal, literal_column, not_, select, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import FromClause, Join, Subquery

from llmtrace.prices import PRICES_TABLE, RATE_COLUMNS, TIER_THRESHOLDS, USER_SOURCE
from llmtrace.record import TRACES_TABLE

# ClickHouse fills the columns of an unmatched LEFT JOIN row with defaults (0, [], '') unless join_use_nulls is
# set; the "priced" flag relies on that, so the queries set it explicitly.
COST_SETTINGS = {"join_use_nulls": 0}
# Ladder of tier thresholds with -1 in front: a group whose inputs pass ``band`` of TIER_THRESHOLDS (see
# tier_band) has exactly the tiers at or below LADDER[band + 1] in force.
_LADDER = "[-1, " + ", ".join(map(str, TIER_THRESHOLDS)) + "]"
# For each band (see tier_band), the position of the tier in force for requests in it: the price's tiers at or
# below the band's ceiling. Computed once per price row, so that a report looks the tier up by position instead
# of evaluating a lambda per cost part, which made ClickHouse's analysis of every report several ms slower.
_TIER_OF_BAND = f"arrayMap(ceiling -> toUInt16(arrayCount(threshold -> threshold <= ceiling, p.tier_above)), {_LADDER})"
_MILLIONTHS = Context(prec=80)
PRICE_FIELDS = ("prompt_includes_cached", "completion_includes_reasoning", "tier_above", *RATE_COLUMNS)
COST_PARTS = ("input_cost", "cached_input_cost", "cache_write_cost", "output_cost", "reasoning_cost", "request_cost")


class AsofLeftJoin(Join):
    """``left ASOF LEFT JOIN right ON ...``: ClickHouse's join on the closest earlier row, which SQLAlchemy lacks."""

    inherit_cache = True


@compiles(AsofLeftJoin)
def _compile_asof_left_join(element: AsofLeftJoin, compiler: SQLCompiler, **kw: Any) -> str:
    kw["asfrom"] = True
    left = compiler.process(element.left, **kw)
    right = compiler.process(element.right, **kw)
    assert element.onclause is not None  # join_prices always gives one
    return f"{left} ASOF LEFT JOIN {right} ON {compiler.process(element.onclause, **kw)}"


def price_rows() -> Subquery:
    """The price rows in force (``FINAL``, deleted ones left out), your own merged with the default list's.

    Your price wins from its ``effective_from`` on, over every default price, later ones included: so the default
    rows of a (provider, model) are kept only before your first price for it. With that, the latest row at or
    before a time is the price in force, and one ``ASOF`` join finds it.

    Written as text: clickhouse-connect's ``final()`` modifier is rendered on a top-level SELECT only, and is
    lost in a subquery. The text is constant (no values from callers).
    """
    p = PRICES_TABLE.c
    names = ["provider", "model", "effective_from", *PRICE_FIELDS]
    table = PRICES_TABLE.name
    # Window functions rather than a join on each model's first own price: half the time (about 3.5 ms against 7).
    own = f"source = '{USER_SOURCE}'"
    statement = text(
        f"SELECT {', '.join(f'p.{name} AS {name}' for name in names)}, toUInt8(1) AS priced, "
        f"{_TIER_OF_BAND} AS tier_of_band "
        f"FROM (SELECT *, countIf({own}) OVER models AS own_prices, minIf(effective_from, {own}) OVER models "
        f"AS first_own FROM {table} FINAL WHERE is_deleted = 0 WINDOW models AS (PARTITION BY provider, model)) AS p "
        f"WHERE p.{own} OR p.own_prices = 0 OR p.effective_from < p.first_own"
    ).columns(*(p[name] for name in names), column("priced", Integer), column("tier_of_band"))
    return statement.subquery("prices")


@dataclass(frozen=True)
class PricedSource:
    """A FROM clause joined to the prices, and the price fields in force for each of its rows."""

    from_: FromClause
    prices: Subquery

    def price(self, name: str) -> ColumnElement[Any]:
        """A price field of the price in force."""
        return self.prices.c[name]

    @property
    def priced(self) -> ColumnElement[bool]:
        return self.prices.c.priced == 1


def join_prices(source: FromClause, provider: Any, model: Any, at: Any) -> PricedSource:
    """``source`` ASOF LEFT JOINed to the prices in force on (provider, model, at)."""
    prices = price_rows()
    on = and_(provider == prices.c.provider, model == prices.c.model, at >= prices.c.effective_from)
    return PricedSource(AsofLeftJoin(source, prices, on), prices)


@dataclass(frozen=True)
class Tokens:
    """Token counts of one trace or summed over a group of traces (absent optional counts as 0).

    ``cache_over_prompt`` / ``reasoning_over_completion``: whether the counts contradict the usual convention
    (see the module docs); for a group, true only if it is true of every trace in it.
    """

    requests: ColumnElement[Any]
    prompt: ColumnElement[Any]
    completion: ColumnElement[Any]
    cached_input: ColumnElement[Any]
    cache_write: ColumnElement[Any]
    reasoning: ColumnElement[Any]
    cache_over_prompt: ColumnElement[Any]
    reasoning_over_completion: ColumnElement[Any]


def cost_parts(
    priced: PricedSource, tokens: Tokens, tier: ColumnElement[Any]
) -> tuple[dict[str, ColumnElement[Any]], ColumnElement[bool]]:
    """Each part of the cost (millionths of a dollar), by name, and whether the trace or group is priced at all.

    ``tier`` is the 1-based position of the tier in force in the price's arrays (see :func:`exact_tier` and
    :func:`band_tier`). The parts are meaningful only where the second value is true.
    """
    includes_cached = priced.price("prompt_includes_cached")
    includes_reasoning = priced.price("completion_includes_reasoning")
    prompt, completion = func.toInt64(tokens.prompt), func.toInt64(tokens.completion)
    cached, written, reasoning = (func.toInt64(t) for t in (tokens.cached_input, tokens.cache_write, tokens.reasoning))
    # In COST_PARTS order, so that each is priced at the rate of RATE_COLUMNS in the same place.
    billable = (
        func.if_(includes_cached, func.greatest(prompt - cached - written, 0), prompt),
        cached,
        written,
        func.if_(includes_reasoning, func.greatest(completion - reasoning, 0), completion),
        reasoning,
        # A fee per thousand requests is a thousand times larger in millionths of a dollar per request.
        func.toInt64(tokens.requests) * 1000,
    )
    priceable = and_(
        priced.priced,
        not_(and_(includes_cached, tokens.cache_over_prompt)),
        not_(and_(includes_reasoning, tokens.reasoning_over_completion)),
    )
    parts = {
        part: count * func.arrayElement(priced.price(rate), tier)
        for part, count, rate in zip(COST_PARTS, billable, RATE_COLUMNS, strict=True)
    }
    return parts, priceable


def total_cost(parts: Mapping[str, ColumnElement[Any]]) -> ColumnElement[Any]:
    """The sum of the parts of :func:`cost_parts`."""
    first, *rest = parts.values()
    return sum(rest, start=first)


def input_for_tiers(priced: PricedSource, tokens: Tokens) -> ColumnElement[Any]:
    """The input size a tier threshold is compared with (see the module docs)."""
    return func.if_(
        priced.price("prompt_includes_cached"),
        func.toInt64(tokens.prompt),
        func.toInt64(tokens.prompt) + func.toInt64(tokens.cached_input) + func.toInt64(tokens.cache_write),
    )


def exact_tier(priced: PricedSource, input_tokens: ColumnElement[Any]) -> ColumnElement[Any]:
    """Position of the tier in force for one request of ``input_tokens``: the tiers whose threshold it exceeds."""
    above = priced.price("tier_above")
    # The lambda only names its own parameters: the input is passed as an array of the same length.
    return func.arrayCount(
        literal_column("(threshold, size) -> size > threshold"),
        above,
        func.arrayWithConstant(func.length(above), input_tokens),
    )


def tier_band(input_tokens: ColumnElement[Any]) -> ColumnElement[Any]:
    """How many of TIER_THRESHOLDS a request of ``input_tokens`` exceeds (what the rollup groups by)."""
    thresholds: ColumnElement[Any] = literal_column("[" + ", ".join(map(str, TIER_THRESHOLDS)) + "]")
    return func.toUInt8(
        func.arrayCount(
            literal_column("(threshold, size) -> size > threshold"),
            thresholds,
            func.arrayWithConstant(len(TIER_THRESHOLDS), func.toInt64(input_tokens)),
        )
    )


def band_tier(priced: PricedSource, band: ColumnElement[Any]) -> ColumnElement[Any]:
    """Position of the tier in force for requests that exceed ``band`` of TIER_THRESHOLDS (price thresholds are
    all among them, so this equals :func:`exact_tier` for each of those requests)."""
    return func.arrayElement(priced.price("tier_of_band"), func.toUInt16(band) + 1)


def dollars(millionths: Any) -> Decimal:
    """An amount in millionths of a dollar (as ClickHouse sums it) in dollars, exactly, without trailing zeros."""
    amount = Decimal(millionths).scaleb(-6, _MILLIONTHS).normalize(_MILLIONTHS)
    # normalize() writes whole amounts with a positive exponent (1E+2); keep them plain (100).
    return amount.quantize(Decimal(1)) if amount.as_tuple().exponent > 0 else amount  # type: ignore[operator]


# -- cost per trace, for ad-hoc queries ------------------------------------------------------------------------


def select_with_cost(*columns: Any) -> Select[Any]:
    """A SELECT of ``columns`` of ``llm_traces`` plus each trace's cost, for ad-hoc queries.

    The added columns: ``cost`` (USD, 0 when unpriced), its parts (``input_cost``, ``cached_input_cost``,
    ``cache_write_cost``, ``output_cost``, ``reasoning_cost``, ``request_cost``), and ``priced`` (whether a
    price applied). Costs here are in millionths of a dollar; :func:`dollars` scales them. Add WHERE clauses
    on ``TRACES_TABLE`` columns as usual::

        statement = select_with_cost(TRACES_TABLE.c.id).where(TRACES_TABLE.c.organization_id == "org-1")
    """
    t = TRACES_TABLE.c
    priced = join_prices(TRACES_TABLE, t.provider, t.model, t.created_at)
    tokens = trace_tokens()
    parts, priceable = cost_parts(priced, tokens, exact_tier(priced, input_for_tiers(priced, tokens)))
    amounts = {name: case((priceable, expression), else_=literal(0)) for name, expression in parts.items()}
    total = total_cost(amounts)
    return (
        select(*columns, total.label("cost"), *(e.label(n) for n, e in amounts.items()), priceable.label("priced"))
        .select_from(priced.from_)
        .execution_options(settings=COST_SETTINGS)
    )


def trace_tokens() -> Tokens:
    """The token counts of each trace of ``llm_traces``."""
    t = TRACES_TABLE.c
    cached, written, reasoning = (
        func.ifNull(c, 0) for c in (t.cached_input_tokens, t.cache_write_tokens, t.reasoning_tokens)
    )
    return Tokens(
        requests=literal(1),
        prompt=t.prompt_tokens,
        completion=t.completion_tokens,
        cached_input=cached,
        cache_write=written,
        reasoning=reasoning,
        cache_over_prompt=cached + written > t.prompt_tokens,
        reasoning_over_completion=reasoning > t.completion_tokens,
    )
