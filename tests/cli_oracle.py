"""What a TraceRepository says about a database, computed in a process of its own and written pickled.

``python -m tests.cli_oracle URL OUT KIND ARGUMENTS_JSON``, where KIND is

- ``add``: ``add_many`` of the pickled traces in ``source`` (after migrating); returns the count stored;
- ``usage``: ``usage()`` with the arguments (``organization`` ``"*"`` is ALL_ORGANIZATIONS; times in ISO 8601);
- ``traces``: every trace of ``organization``, read with ``get()`` for the ids ``list()`` pages through;
- ``count``: ``count()`` of ``organization``;
- ``execute``: run each SQL statement of ``statements`` on the engine (with ``settings``); returns None.
"""

from __future__ import annotations

import json
import pickle
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from llmtrace import ALL_ORGANIZATIONS, TraceRepository, get_engine
from llmtrace.filters import OrganizationScope
from llmtrace.migrations import upgrade


def scope(name: str) -> OrganizationScope:
    return ALL_ORGANIZATIONS if name == "*" else name


def compute(repository: TraceRepository, kind: str, arguments: dict[str, Any]) -> Any:
    if kind == "add":
        upgrade(repository.engine)
        return repository.add_many(pickle.loads(Path(arguments["source"]).read_bytes()))
    if kind == "execute":
        with repository.engine.connect() as connection:
            for statement in arguments["statements"]:
                connection.execute(text(statement), execution_options={"settings": arguments.get("settings", {})})
        return None
    organization = scope(arguments.pop("organization"))
    for name in ("since", "until"):
        if arguments.get(name) is not None:
            arguments[name] = datetime.fromisoformat(arguments[name])
    if kind == "usage":
        return repository.usage(organization, **arguments)
    if kind == "count":
        return repository.count(organization, **arguments)
    if kind == "traces":
        assert isinstance(organization, str)
        found, cursor = [], None
        while True:
            page = repository.list(organization, limit=500, cursor=cursor)
            found += [repository.get(organization, trace.id) for trace in page.items]
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor
    raise ValueError(f"unknown kind {kind!r}")


if __name__ == "__main__":
    url, out, kind, arguments = sys.argv[1:]
    result = compute(TraceRepository(get_engine(url)), kind, json.loads(arguments))
    Path(out).write_bytes(pickle.dumps(result))
