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
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import IO, Any

from rich import box
from rich.table import Table
from rich.text import Text

from llmtrace.usage import PERCENTILE_FIELDS, UsageRow

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
    """A Rich table of the report, for reading at a glance; CSV and JSON carry the exact values.

    Numbers are right-aligned with thousands separators; a column of counts that reach a million is shown in
    k/M/B (sizes in ``*_bytes`` columns in kB/MB/GB); unknown values are "-". Measures that are ``None`` in every
    row are left out: those no trace reported (named by :func:`unreported`), and percentiles not asked for.
    """
    found = records(rows, keys)
    measures = [name for name in measure_names(rows) if any(getattr(row, name) is not None for row in rows)]
    shown = [*([BUCKET] if granularity is not None else []), *keys, *measures]
    formats = {name: _column_format(name, [record[name] for record in found]) for name in measures}
    bucket_format = BUCKET_FORMATS[granularity or "day"]
    lines = []
    for record in found:
        cells: list[Text] = []
        for name in shown:
            value = record[name]
            if name in keys:
                cells.append(Text("(none)", style="dim") if value is None else Text(str(value)))
            elif name == BUCKET:
                cells.append(Text(value.strftime(bucket_format) if value is not None else "-"))
            else:
                cells.append(formats[name](value))
        lines.append(cells)
    result = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False, collapse_padding=True)
    for index, name in enumerate(shown):
        numeric = name in measures
        # The keys keep their width when the terminal is too narrow for the table: a row must say what it counts.
        widest = None if numeric else min(max((line[index].cell_len for line in lines), default=0), 40)
        result.add_column(_header(name), justify="right" if numeric else "left", no_wrap=True, min_width=widest)
    for line in lines:
        result.add_row(*line)
    return result


def unreported(rows: Sequence[UsageRow]) -> list[str]:
    """The measures that are ``None`` in every row because no trace reported them, in declaration order.

    Latency percentiles are left out: every trace has a latency, so they are ``None`` only in a report that asked
    for none (``percentiles=None``), which is not something the traces failed to report.
    """
    if not rows:
        return []
    return [
        name
        for name in measure_names(rows)
        if name not in PERCENTILE_FIELDS and all(getattr(row, name) is None for row in rows)
    ]


def _header(name: str) -> str:
    """The column name on at most two lines, split where the longer line is shortest."""
    words = name.split("_")
    if len(words) == 1:
        return name
    splits = [(" ".join(words[:i]), " ".join(words[i:])) for i in range(1, len(words))]
    first, second = min(splits, key=lambda pair: max(len(pair[0]), len(pair[1])))
    return f"{first}\n{second}"


COMPACT_FROM = 1_000_000
_COUNT_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))
_BYTE_UNITS = ((1e12, " TB"), (1e9, " GB"), (1e6, " MB"), (1e3, " kB"))


def _column_format(name: str, values: Sequence[object]) -> Callable[[object], Text]:
    largest = max((abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool)), default=0)
    units = _BYTE_UNITS if name.endswith("_bytes") else _COUNT_UNITS
    compact = largest >= COMPACT_FROM

    def cell(value: object) -> Text:
        if value is None:
            return Text("-", style="dim")
        if isinstance(value, bool):
            return Text("true" if value else "false")
        if isinstance(value, int):
            return Text(_compact(value, units) if compact else f"{value:,}")
        if isinstance(value, float):
            return Text(f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}")
        if isinstance(value, Decimal):
            # Money and other exact quantities: four decimals here; CSV and JSON carry every digit.
            return Text(f"{value:,.4f}")
        return Text(str(value))

    return cell


def _compact(value: int, units: Sequence[tuple[float, str]]) -> str:
    for limit, suffix in units:
        if abs(value) >= limit:
            return f"{value / limit:,.1f}{suffix}"
    return f"{value:,}"
