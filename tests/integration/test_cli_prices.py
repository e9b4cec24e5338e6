"""`llmtrace prices`: list, set, sync and refresh, run as commands, and the reports they re-price."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from llmtrace.price_list import default_prices
from tests.cli_support import llmtrace, repository_call
from tests.factories import make_trace


def test_prices_set_list_sync_and_refresh(tmp_path: Path) -> None:
    url = f"chdb:///{tmp_path / 'db'}"
    march = datetime(2026, 3, 1, tzinfo=UTC)
    traces = [
        make_trace(0, provider="acme", model="house-7", prompt_tokens=2_000_000, completion_tokens=0,
                   cached_input_tokens=None, created_at=march),
        make_trace(1, provider="anthropic", model="claude-sonnet-4-20250514", created_at=march),
    ]  # fmt: skip
    assert repository_call(url, tmp_path, "add", traces=traces) == 2

    def report() -> dict[str, str]:
        result = llmtrace("usage", "--all-organizations", "--by", "model", "--format", "json", url=url)
        assert result.returncode == 0, result.stderr
        return {row["model"]: row for row in json.loads(result.stdout)}

    before = report()
    assert before["house-7"]["unpriced_requests"] == 1 and before["house-7"]["cost"] == "0"

    bad = llmtrace("prices", "set", "acme", "house-7", "--input", "cheap", "--output", "1", url=url)
    assert bad.returncode == 1
    assert bad.stderr.startswith("llmtrace: invalid price: --input takes a number of USD per million tokens")
    off_hour = llmtrace("prices", "set", "acme", "house-7", "--input", "1", "--output", "1",
                        "--from", "2026-01-01T00:30:00+00:00", url=url)  # fmt: skip
    assert off_hour.returncode == 1 and "not a whole UTC hour" in off_hour.stderr

    done = llmtrace("prices", "set", "acme", "house-7", "--input", "0.25", "--output", "1", url=url)
    assert done.returncode == 0, done.stderr
    after = report()
    assert after["house-7"]["unpriced_requests"] == 0
    assert Decimal(after["house-7"]["cost"]) + Decimal(after["house-7"]["byok_cost"]) == Decimal("0.5")

    listed = llmtrace("prices", "list", "--provider", "acme", "--format", "json", url=url)
    (price,) = json.loads(listed.stdout)
    assert (price["model"], price["source"], Decimal(price["tiers"][0]["input"])) == (
        "house-7",
        "user",
        Decimal("0.25"),
    )

    synced = llmtrace("prices", "sync", url=url)
    assert synced.returncode == 0
    assert "priced: anthropic claude-sonnet-4-20250514" in synced.stdout
    assert report()["claude-sonnet-4-20250514"]["unpriced_requests"] == 0

    refreshed = llmtrace("prices", "refresh", url=url)
    assert refreshed.stdout.strip() == f"The default list holds {len(default_prices()):,} prices."
    assert Decimal(report()["house-7"]["cost"]) + Decimal(report()["house-7"]["byok_cost"]) == Decimal("0.5")
