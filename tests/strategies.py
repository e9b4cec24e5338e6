"""Hypothesis strategies for valid LLMTrace objects, covering what storage must keep exactly."""

from __future__ import annotations

from datetime import datetime

from hypothesis import strategies as st

from llmtrace import LLMTrace
from llmtrace.model import UINT32_MAX

# Text that stresses storage: any code point except surrogates (which UTF-8 cannot encode), so emoji,
# right-to-left scripts, quotes, backslashes, NUL and newlines all appear.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
optional_text = st.none() | any_text
# An organization id names a tenant: any text but a blank one.
organization_ids = any_text.filter(lambda text: text.strip() != "")
tokens = st.integers(0, UINT32_MAX)
optional_tokens = st.none() | st.integers(0, 3) | tokens
created_at = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(2299, 12, 30), timezones=st.none() | st.timezones()
)


@st.composite
def llm_traces(draw: st.DrawFn, *, id_prefix: str = "") -> LLMTrace:
    prompt = draw(st.integers(0, 2**31 - 1))
    completion = draw(st.integers(0, 2**31 - 1))
    return LLMTrace(
        id=id_prefix + draw(any_text),
        organization_id=draw(organization_ids),
        project_id=draw(optional_text),
        agent_id=draw(optional_text),
        agent_tags=draw(st.lists(any_text, max_size=30)),
        run_id=draw(optional_text),
        step_id=draw(optional_text),
        trace_id=draw(optional_text),
        call_type=draw(any_text),
        provider=draw(any_text),
        model=draw(any_text),
        is_byok=draw(st.booleans()),
        request_size_bytes=draw(st.integers(0, 2**64 - 1)),
        response_size_bytes=draw(st.integers(0, 2**64 - 1)),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=draw(st.just(0) | tokens),
        cached_input_tokens=draw(optional_tokens),
        cache_write_tokens=draw(optional_tokens),
        reasoning_tokens=draw(optional_tokens),
        latency_ms=draw(tokens),
        is_error=draw(st.booleans()),
        error_type=draw(optional_text),
        error_message=draw(optional_text),
        request_json=draw(any_text | st.text(max_size=5000)),
        response_json=draw(any_text),
        llm_config_json=draw(any_text),
        billing_plan_type=draw(optional_text),
        billing_cost_source=draw(optional_text),
        billing_customer_id=draw(optional_text),
        created_at=draw(created_at),
    )
