"""The default price list: genai-prices' offline snapshot turned into rows of the ``llm_model_prices`` table.

genai-prices (PyPI) is a maintained database of LLM prices with their history. Its Python package ships a
snapshot, so building the list needs no network. What it holds and how it maps here:

- Each provider's models, found by the names a request may use: the model's id and the exact names its
  matching rules list (``equals`` clauses), plus the models of the providers it falls back to (Azure serves
  OpenAI's, for instance). Each name is priced as genai-prices itself resolves that name for that provider, so
  a name that another model's rule claims first gets that model's price. Names only its prefix or pattern rules
  would match (dated variants, for instance) are not listed: :func:`llmtrace.prices.price_unpriced_models`
  adds them for the names that traces actually use.
- Prices that change on a date (a ``start_date`` constraint) become rows with that ``effective_from``; the
  first price applies from the start of time, as genai-prices uses it for any earlier request.
- Tiered prices (the whole request priced at a higher rate once its input passes a threshold) become the
  row's tiers.
- Not represented: time-of-day discounts (the standard price applies at every hour), request-context variants
  such as service tiers (the standard price applies), and units traces do not count (images, audio, searches).
  Models with no price per token at all are left out, so their traces count as unpriced rather than free.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from llmtrace.prices import EARLIEST, ModelPrice, Tier

SOURCE = "genai-prices"
# What a request's own price keys fall back to when genai-prices has no price for a kind of token: it then
# counts those tokens inside their parent (cache reads and writes inside the input, reasoning inside the
# output) at the parent's rate.
_KEYS = {
    "input": ("input_mtok", None),
    "cached_input": ("cache_read_mtok", "input"),
    "cache_write": ("cache_write_mtok", "input"),
    "output": ("output_mtok", None),
    "reasoning": ("output_reasoning_mtok", "output"),
}
# Provider names LLM platforms use for a provider genai-prices knows by another id. Each is kept only if
# genai-prices itself resolves it to a provider (its provider_match rules), so the mapping stays theirs.
PROVIDER_ALIASES = (
    "google_ai",
    "google_vertex",
    "vertex_ai",
    "gemini",
    "bedrock",
    "xai",
    "azure_openai",
    "mistralai",
    "together_ai",
    "fireworks_ai",
)


@lru_cache(maxsize=1)
def default_prices() -> tuple[ModelPrice, ...]:
    """Every price row of the default list (computed once per process: resolving names takes a second)."""
    from genai_prices import data_snapshot

    providers = data_snapshot.get_snapshot().providers
    names_by_provider: dict[str, list[str]] = {provider.id: [provider.id] for provider in providers}
    for alias in PROVIDER_ALIASES:
        provider = data_snapshot.find_provider_by_id(providers, alias)
        if provider is not None and alias != provider.id:
            names_by_provider[provider.id].append(alias)
    rows: list[ModelPrice] = []
    for provider in providers:
        for model_name, model in _resolved_models(provider, providers):
            for provider_name in names_by_provider[provider.id]:
                rows.extend(_rows_for(provider_name, model_name, model))
    return tuple(rows)


def genai_price_rows(provider_name: str, model_name: str) -> list[ModelPrice]:
    """The rows genai-prices gives for one (provider, model) pair as traces name them, or ``[]`` if it has none."""
    from genai_prices import data_snapshot

    providers = data_snapshot.get_snapshot().providers
    provider = data_snapshot.find_provider_by_id(providers, provider_name)
    if provider is None:
        return []
    model = provider.find_model(model_name, all_providers=providers)
    return [] if model is None else list(_rows_for(provider_name, model_name, model))


def _resolved_models(provider: Any, providers: list[Any]) -> Iterator[tuple[str, Any]]:
    """(name, model genai-prices resolves that name to) for every name a request to ``provider`` may use."""
    candidates = [*provider.models]
    for fallback_id in provider.fallback_model_providers or ():
        candidates.extend(next((p.models for p in providers if p.id == fallback_id), []))
    seen: set[str] = set()
    for model in candidates:
        for name in (model.id, *_exact_names(model.match)):
            name = name.lower()
            if name in seen:
                continue
            seen.add(name)
            resolved = provider.find_model(name, all_providers=providers)
            if resolved is not None:
                yield name, resolved


def _exact_names(clause: Any) -> Iterator[str]:
    if hasattr(clause, "equals"):
        yield clause.equals
    for child in getattr(clause, "or_", ()):
        yield from _exact_names(child)


def _rows_for(provider_name: str, model_name: str, model: Any) -> Iterator[ModelPrice]:
    from genai_prices import types

    conditional = model.prices if isinstance(model.prices, list) else [types.ConditionalPrice(prices=model.prices)]
    dated = [entry for entry in conditional if not isinstance(entry.constraint, types.TimeOfDateConstraint)]
    # genai-prices uses the last entry in force; one without a constraint is always in force, so the entries
    # listed before it never apply.
    unconditional = [position for position, entry in enumerate(dated) if entry.constraint is None]
    dated = dated[unconditional[-1] :] if unconditional else dated
    for position, entry in enumerate(dated):
        # The first price is what genai-prices falls back to before any start date, so it holds from the start.
        constraint = entry.constraint
        start = EARLIEST
        if isinstance(constraint, types.StartDateConstraint) and position > 0:
            start = _midnight(constraint.start_date)
        row = _price_row(provider_name, model_name, start, entry.prices)
        if row is not None:
            yield row


def _price_row(provider_name: str, model_name: str, start: datetime, prices: Any) -> ModelPrice | None:
    from genai_prices import types

    values = {key: getattr(prices, price_key, None) for key, (price_key, _) in _KEYS.items()}
    if values["input"] is None and values["output"] is None:
        return None
    per_request = getattr(prices, "requests_kcount", None)
    thresholds = sorted(
        {
            tier.start
            for value in [*values.values(), per_request]
            if isinstance(value, types.TieredPrices)
            for tier in value.tiers
        }
    )

    def at(key: str, above: int | None) -> Decimal:
        value = values[key]
        if value is None:
            fallback = _KEYS[key][1]
            return at(fallback, above) if fallback is not None else Decimal(0)
        return _tier_value(value, above)

    tiers = tuple(
        Tier(
            above_input_tokens=above,
            input=at("input", above),
            cached_input=at("cached_input", above),
            cache_write=at("cache_write", above),
            output=at("output", above),
            reasoning=at("reasoning", above),
            per_thousand_requests=Decimal(0) if per_request is None else _tier_value(per_request, above),
        )
        for above in [None, *thresholds]
    )
    return ModelPrice(provider=provider_name, model=model_name, effective_from=start, tiers=tiers, source=SOURCE)


def _tier_value(value: Any, above: int | None) -> Decimal:
    """The rate for a request whose input is just above ``above`` tokens (``None``: the base rate).

    genai-prices applies a tier once the input exceeds the tier's start, and the highest such tier wins; the
    row's tiers start at every threshold any of the model's prices has, so just above ``above`` exactly the
    tiers starting at or below it apply.
    """
    if isinstance(value, Decimal):
        return value
    rate: Decimal = value.base
    if above is not None:
        for tier in value.tiers:  # sorted by start
            if tier.start <= above:
                rate = tier.price
    return rate


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
