"""Reading a spool directory back in tests: which traces are in it, and what its quarantine holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtrace import LLMTrace
from llmtrace.spool import QUARANTINE_DIRECTORY, QUARANTINE_FILE, SUFFIX
from llmtrace.spool_format import Record, read_file_header, read_records


def spooled_traces(directory: Path) -> list[LLMTrace]:
    """Every readable trace in the spool files of ``directory``, in file and record order."""
    found: list[LLMTrace] = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        with open(path, "rb") as handle:
            header, start = read_file_header(handle.fileno())
            for item in read_records(handle.fileno(), header, start):
                if isinstance(item, Record):
                    found.extend(item.traces)
    return found


def quarantine_entries(directory: Path) -> list[dict[str, Any]]:
    """The entries of the spool directory's quarantine file (none if it does not exist)."""
    path = directory / QUARANTINE_DIRECTORY / QUARANTINE_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
