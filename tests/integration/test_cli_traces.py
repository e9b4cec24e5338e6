"""``llmtrace traces``: an organization's traces newest first, page by page with cursors, and one trace in full."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtrace import LLMTrace
from tests.cli_support import llmtrace, repository_call
from tests.factories import make_trace


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("traces")
    url = f"chdb:///{directory / 'db'}"
    traces = [make_trace(i, is_error=i % 5 == 0, error_type="Timeout" if i % 5 == 0 else None) for i in range(25)]
    traces.append(make_trace(99, organization_id="org-2"))
    assert repository_call(url, directory, "add", traces=traces) == 26
    return url


def test_pages_by_cursor_cover_every_trace_once_newest_first(seeded: str) -> None:
    seen: list[LLMTrace] = []
    cursor: list[str] = []
    while True:
        result = llmtrace("traces", "--org", "org-1", "--limit", "10", "--format", "json", *cursor, url=seeded)
        assert result.returncode == 0, result.stderr
        page = json.loads(result.stdout)
        seen += [LLMTrace.model_validate(item) for item in page["traces"]]
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]
    assert seen == sorted((make_trace(i, is_error=i % 5 == 0, error_type="Timeout" if i % 5 == 0 else None)
                           for i in range(25)), key=lambda t: t.created_at, reverse=True)  # fmt: skip


def test_table_with_filters_and_the_next_cursor(seeded: str) -> None:
    result = llmtrace("traces", "--org", "org-1", "--where", "is_error=true", "--limit", "3", url=seeded)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Traces of org-1, newest first"
    assert "created at (UTC)" in lines[1] and "latency ms" in lines[1]
    rows = [line for line in lines if line.startswith("2026-")]
    assert [row.split()[2] for row in rows] == [make_trace(i).id for i in (20, 15, 10)]
    assert all(row.rstrip().endswith("Timeout") for row in rows)
    assert lines[-1].startswith("Next page: --cursor ")


def test_show_prints_one_trace_with_its_payloads_pretty(seeded: str) -> None:
    trace = make_trace(7)
    result = llmtrace("traces", "--org", "org-1", "--show", trace.id, url=seeded)
    assert result.returncode == 0, result.stderr
    assert f"id                   {trace.id}" in result.stdout
    assert "request_json (" in result.stdout
    # Pretty-printed: one key per line, indented.
    assert '\n  "messages": [\n' in result.stdout
    as_json = llmtrace("traces", "--org", "org-1", "--show", trace.id, "--format", "json", url=seeded)
    assert LLMTrace.model_validate_json(as_json.stdout) == trace


def test_show_of_another_organizations_trace_is_not_found(seeded: str) -> None:
    result = llmtrace("traces", "--org", "org-1", "--show", make_trace(99).id, url=seeded)
    assert result.returncode == 1
    assert result.stderr == f"llmtrace: No trace with id {make_trace(99).id!r} in organization 'org-1'.\n"


def test_a_cursor_of_other_filters_is_refused(seeded: str, tmp_path: Path) -> None:
    first = json.loads(llmtrace("traces", "--org", "org-1", "--limit", "2", "--format", "json", url=seeded).stdout)
    result = llmtrace("traces", "--org", "org-2", "--cursor", first["next_cursor"], url=seeded)
    assert result.returncode == 1
    assert result.stderr == "llmtrace: This cursor was issued for another organization; start again without a cursor.\n"
    assert llmtrace("traces", url=seeded).returncode == 2  # --org is required
