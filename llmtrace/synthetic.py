"""Generate realistic synthetic traces, for the demo and the benchmarks."""

from __future__ import annotations

import itertools
import json
import math
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from llmtrace.model import LLMTrace

MODELS = (
    ("openai", "gpt-4.1"),
    ("openai", "gpt-4.1-mini"),
    ("anthropic", "claude-sonnet-4"),
    ("anthropic", "claude-haiku-4-5"),
    ("google_ai", "gemini-2.5-pro"),
)
CALL_TYPES = ("agent_step", "agent_step", "agent_step", "summarization", "embedding")
PLANS = ("free", "pro", "pro", "enterprise")
ERRORS = ("RateLimitError", "APITimeoutError", "ContextWindowExceededError")
_SLOT = "<content>"


def synthetic_traces(
    count: int,
    *,
    organizations: int = 3,
    agents_per_organization: int = 5,
    payload_bytes: tuple[int, int] = (200, 50_000),
    end: datetime | None = None,
    span: timedelta = timedelta(days=1),
    seed: int | None = 0,
    in_time_order: bool = False,
    skew: float = 0.0,
) -> Iterator[LLMTrace]:
    """Yield ``count`` traces spread over ``span`` before ``end`` (default: now), reproducible by ``seed``.

    Args:
        count: How many traces to generate.
        organizations: Distinct organization ids.
        agents_per_organization: Distinct agent ids per organization.
        payload_bytes: Range of the request payload size, drawn log-uniformly (most calls are small, a few
            are large, as in real traffic); responses are a quarter of it.
        end: Latest possible ``created_at``.
        span: How far before ``end`` the earliest trace may be.
        seed: Seed of the random generator, so runs can be compared; ``None`` for a fresh one.
        in_time_order: Yield traces oldest first, as a live service produces them (default: random order).
        skew: 0 spreads traces evenly over organizations and agents. Above 0, the organization of rank ``r``
            gets a share of traffic, and of the ``organizations * agents_per_organization`` agents, in
            proportion to ``1 / r ** skew`` (Zipf's law), as on a multi-tenant platform where a few heavy
            tenants sit among thousands of small ones; ~1.1 is typical.
    """
    rng = random.Random(seed)
    tenants = _Tenants(organizations, agents_per_organization, skew)
    end = end or datetime.now(UTC)
    low, high = math.log(payload_bytes[0]), math.log(payload_bytes[1])
    filler = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(payload_bytes[1]))
    # The filler needs no JSON escaping, so payloads are templates with the filler spliced in: encoding up to
    # 50 KB per trace with json.dumps took a third of the generation time.
    requests = {
        model: json.dumps({"model": model, "messages": [{"role": "user", "content": _SLOT}]}) for _, model in MODELS
    }
    response = json.dumps({"content": _SLOT})
    configs = {model: json.dumps({"model": model, "temperature": 0.7}) for _, model in MODELS}
    ages = [rng.uniform(0, span.total_seconds()) for _ in range(count)]
    if in_time_order:
        ages.sort(reverse=True)
    for age in ages:
        provider, model = rng.choice(MODELS)
        organization, agent = tenants.draw(rng)
        size = round(math.exp(rng.uniform(low, high)))
        is_error = rng.random() < 0.02
        is_byok = rng.random() < 0.1
        prompt = rng.randint(50, 20_000)
        completion = 0 if is_error else rng.randint(10, 2_000)
        yield LLMTrace(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            organization_id=f"org-{organization}",
            project_id=f"project-{organization}",
            agent_id=f"agent-{organization}-{agent}",
            agent_tags=["demo", f"team-{agent % 3}"],
            run_id=f"run-{rng.getrandbits(32):08x}",
            step_id=f"step-{rng.getrandbits(32):08x}",
            trace_id=f"{rng.getrandbits(128):032x}",
            call_type=rng.choice(CALL_TYPES),
            provider=provider,
            model=model,
            is_byok=is_byok,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_input_tokens=rng.randint(0, prompt) if provider == "anthropic" else None,
            # Reasoning is part of the completion (the providers' usual count).
            reasoning_tokens=rng.randint(0, min(500, completion)) if model.startswith("gpt-4.1") else None,
            latency_ms=rng.randint(150, 30_000),
            is_error=is_error,
            error_type=rng.choice(ERRORS) if is_error else None,
            error_message="upstream error" if is_error else None,
            request_json=requests[model].replace(_SLOT, filler[:size]),
            response_json=response.replace(_SLOT, filler[: size // 4]),
            llm_config_json=configs[model],
            billing_plan_type=PLANS[organization % len(PLANS)],
            billing_cost_source="customer_key" if is_byok else "platform",
            billing_customer_id=f"cus_{organization:06d}",
            created_at=end - timedelta(seconds=age),
        )


class _Tenants:
    """Who a generated trace belongs to: organizations and their agents, evenly or Zipf-distributed."""

    def __init__(self, organizations: int, agents_per_organization: int, skew: float) -> None:
        if organizations < 1 or agents_per_organization < 1:
            raise ValueError("organizations and agents_per_organization must be at least 1")
        if skew < 0:
            raise ValueError(f"skew must be 0 or more, got {skew}")
        weights = [1 / rank**skew for rank in range(1, organizations + 1)]
        total = sum(weights)
        self._cumulative = list(itertools.accumulate(weights))
        agents = organizations * agents_per_organization
        self._agents = [max(1, round(agents * weight / total)) for weight in weights]
        self._organizations = range(organizations)
        self._even = skew == 0

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if self._even:
            organization = rng.randrange(len(self._organizations))
        else:
            (organization,) = rng.choices(self._organizations, cum_weights=self._cumulative)
        return organization, rng.randrange(self._agents[organization])
