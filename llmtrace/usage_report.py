"""The usage report as people and programs read it: flat records, JSON, CSV and a Rich table.

Every column comes from :class:`~llmtrace.usage.UsageRow` itself (``dataclasses.fields``): the time bucket, one
column per group key, then every measure in the order the class declares it. A measure added to ``UsageRow``
appears in all three formats without a change here. Values keep their exact form where the format allows:
``Decimal`` as its string (JSON numbers would be read back as binary floats), datetimes in ISO 8601 with their
zone, ``None`` as JSON ``null`` and as an empty CSV cell (unknown is not zero).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import IO, Any

from rich import box
from rich.table import Table
from rich.text import Text

from llmtrace.usage import UsageRow

BUCKET = "bucket"
GROUP = "group"
# How the table shows a bucket's start, per granularity.
BUCKET_FORMATS = {"hour": "%Y-%m-%d %H:%M", "day": "%Y-%m-%d", "month": "%Y-%m"}


def measure_names(rows: Sequence[UsageRow] = ()) -> list[str]:
    """The measures of usage rows, in declaration order (every field but the group and bucket).

    Read from the rows' own class (:class:`UsageRow` when there are none), so that a subclass's measures show too.
    """
    row_type = type(rows[0]) if rows else UsageRow
    return [field.name for field in dataclasses.fields(row_type) if field.name not in (GROUP, BUCKET)]


def columns(rows: Sequence[UsageRow], keys: Sequence[str]) -> list[str]:
    """The columns of a report grouped by ``keys``: the bucket, the group keys, then the measures."""
    return [BUCKET, *keys, *measure_names(rows)]


def records(rows: Sequence[UsageRow], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Each row as a flat mapping of :func:`columns` to its values, unchanged (Decimal, datetime, None)."""
    measures = measure_names(rows)
    return [
        {BUCKET: row.bucket, **{key: row.group[key] for key in keys}, **{name: getattr(row, name) for name in measures}}
        for row in rows
    ]


def write_json(rows: Sequence[UsageRow], keys: Sequence[str], out: IO[str]) -> None:
    """Write the report as one JSON array of objects."""
    json.dump(records(rows, keys), out, default=_json_value, ensure_ascii=False, indent=2)
    out.write("\n")


def write_csv(rows: Sequence[UsageRow], keys: Sequence[str], out: IO[str]) -> None:
    """Write the report as CSV with a header row; ``None`` is an empty cell, ``Decimal`` its ``str()``."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns(rows, keys))
    for record in records(rows, keys):
        writer.writerow([csv_value(value) for value in record.values()])


def csv_value(value: object) -> str:
    """How a value is written in a CSV cell: exact, and ``None`` distinct from every value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _json_value(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def table(rows: Sequence[UsageRow], keys: Sequence[str], *, granularity: str | None) -> Table:
    """A Rich table of the report: numbers right-aligned with thousands separators, unknown values as "-"."""
    shown = [BUCKET] if granularity is not None else []
    shown += [*keys, *measure_names(rows)]
    result = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for name in shown:
        numeric = name not in keys and name != BUCKET
        result.add_column(name.replace("_", " "), justify="right" if numeric else "left", overflow="fold")
    for record in records(rows, keys):
        result.add_row(
            *("(none)" if name in keys and record[name] is None else _cell(record[name], granularity) for name in shown)
        )
    return result


def _cell(value: object, granularity: str | None) -> Text | str:
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.strftime(BUCKET_FORMATS.get(granularity or "", "%Y-%m-%d %H:%M"))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, Decimal):
        # Money and other exact quantities: four decimals in the table; CSV and JSON carry every digit.
        return f"{value:,.4f}"
    return str(value)
