"""Trace files: JSON Lines, CSV and Parquet, read item by item and written batch by batch.

One trace per JSON line (the fields of :class:`~llmtrace.LLMTrace` as JSON, ``created_at`` in ISO 8601), per CSV
row (a header row names the fields) or per Parquet row. Readers number what they yield as a person finds it in
the file (JSON Lines and CSV: the line a trace starts on; Parquet: the row, from 1) and turn what cannot be read
into an :class:`Unreadable` item rather than an exception, so that a batch's problems are reported together.

How values are written, so that reading them back gives the same trace:

- JSON Lines: as the model serialises to JSON (``LLMTrace.model_dump_json``): microseconds and the UTC zone,
  ``null`` for an absent value.
- CSV: an empty cell is an absent value (``None``) in a field that may be absent, and ``""`` in the payload fields
  that may not; ``agent_tags`` is a JSON array; flags are ``true``/``false``; ``created_at`` is ISO 8601.
- Parquet: typed columns (:data:`PARQUET_SCHEMA`): unsigned integers of the column's width, nulls where a count is
  unknown, ``timestamp[us, UTC]``. pyarrow comes with llmtrace's ``reports`` extra.

Writers take batches, so that an export holds one page of traces at a time; a Parquet file gets one row group
per batch.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import NoneType
from typing import Any, BinaryIO, Protocol, get_args

from llmtrace.errors import ConfigurationError, ExtraNotInstalled
from llmtrace.model import CLICKHOUSE_COLUMNS, LLMTrace

FORMATS = ("jsonl", "csv", "parquet")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Fields that may be absent (None): an empty CSV cell means None there, and "" in every other field.
NULLABLE_FIELDS = frozenset(
    name for name, info in LLMTrace.model_fields.items() if NoneType in get_args(info.annotation)
)
FLAG_FIELDS = frozenset({"is_byok", "is_error"})
LIST_FIELDS = frozenset({"agent_tags"})
# Large enough to be read efficiently, small enough to bound memory: pyarrow's batches when reading Parquet.
PARQUET_READ_BATCH = 1_000
# The longest CSV cell read; the csv module's default, 128 KiB, is shorter than many payloads.
CSV_FIELD_SIZE_LIMIT = 2**31 - 1
# How files that are not text start: a JSON Lines or CSV import given one says what it is, not a problem per line.
BINARY_SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip -c FILE | llmtrace import --format FORMAT -)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (zstd -dc FILE | llmtrace import --format FORMAT -)"),
    (b"BZh", "bzip2-compressed", "decompress it first (bzip2 -dc FILE | llmtrace import --format FORMAT -)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (xz -dc FILE | llmtrace import --format FORMAT -)"),
    (b"PK\x03\x04", "a zip archive", "extract the file from it first"),
    (b"PAR1", "a Parquet file", "name it *.parquet or pass --format parquet"),
)


@dataclass(frozen=True)
class Unreadable:
    """An item of a file that is not a mapping of trace fields: which field (or ``(line)``) and why."""

    field: str
    message: str


Item = dict[str, Any] | Unreadable


def file_format(path: str, given: str | None) -> str:
    """The format of ``path``: ``given`` when set, else from its suffix (``-``, for standard input or output: jsonl).

    Raises:
        ConfigurationError: ``given`` is not a known format, or the suffix names none.
    """
    if given is not None:
        if given not in FORMATS:
            raise ConfigurationError(f"Unknown file format {given!r}; use one of {', '.join(FORMATS)}.")
        return given
    if path == "-":
        return "jsonl"
    found = SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise ConfigurationError(
            f"Cannot tell the format of {path} from its name; name it *.jsonl, *.csv or *.parquet, or pass --format."
        )
    return found


def position_name(format_name: str) -> str:
    """What the numbers a reader yields count: lines of text files, rows of Parquet files."""
    return "row" if format_name == "parquet" else "line"


# -- reading --------------------------------------------------------------------------------------------------


def read_items(stream: BinaryIO, format_name: str) -> Iterator[tuple[int, Item]]:
    """Yield ``(line or row number, item)`` for every trace of a file, one at a time.

    Args:
        stream: The file, opened in binary mode (standard input's buffer for ``-``). A Parquet file needs a
            seekable stream; standard input is read into memory first.
        format_name: One of :data:`FORMATS`.

    Raises:
        ConfigurationError: A JSON Lines or CSV file starts as a compressed, archived or Parquet file does (checked
            when ``stream`` can be peeked at, as buffered files and standard input can).
    """
    if format_name == "parquet":
        return _read_parquet(stream)
    _refuse_binary(stream, format_name)
    if format_name == "jsonl":
        return _read_jsonl(stream)
    return _read_csv(stream)


def _refuse_binary(stream: BinaryIO, format_name: str) -> None:
    peek = getattr(stream, "peek", None)
    if peek is None:
        return
    head = peek(8)
    for signature, what, advice in BINARY_SIGNATURES:
        if head.startswith(signature):
            label = "JSON Lines" if format_name == "jsonl" else "CSV"
            raise ConfigurationError(f"The input is {what}, not {label} text: {advice.replace('FORMAT', format_name)}.")
    # A .json file is read as JSON Lines; many .json files hold one array of objects instead.
    if format_name == "jsonl" and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        raise ConfigurationError(
            "The input is a JSON array, not JSON Lines (one trace object per line): convert it first "
            "(jq -c '.[]' FILE | llmtrace import -)."
        )


class _RepeatedKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _first_repeated(names: Iterable[str]) -> str | None:
    """The first name given more than once (a JSON key, a CSV or Parquet column), or ``None``."""
    return next((name for name, count in Counter(names).items() if count > 1), None)


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys without a word: a line that names organization_id twice would be
    # stored in whichever organization comes last. Such a line is ambiguous, and refused.
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _RepeatedKeyError(str(_first_repeated(key for key, _ in pairs)))
    return value


def _read_jsonl(stream: BinaryIO) -> Iterator[tuple[int, Item]]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=_refuse_repeated_keys)
        except UnicodeDecodeError as exc:
            yield number, Unreadable("(line)", f"not UTF-8 text: {exc.reason} at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            yield number, Unreadable("(line)", f"not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        except _RepeatedKeyError as exc:
            yield number, Unreadable(exc.key, "the field is given more than once in the line")
            continue
        except RecursionError:
            yield number, Unreadable("(line)", "not valid JSON: arrays or objects nested too deeply")
            continue
        if not isinstance(value, dict):
            yield number, Unreadable("(line)", f"expected a JSON object of trace fields, got {type(value).__name__}")
            continue
        yield number, value


def _read_csv(stream: BinaryIO) -> Iterator[tuple[int, Item]]:
    # utf-8-sig: spreadsheets start their CSV files with a byte order mark. surrogateescape: bytes that are not UTF-8
    # reach the cell they are in, which names them (see _csv_item); a decoding error would stop the reader at the
    # chunk of the file being decoded, lines before the bad one.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)  # a process-wide setting
    reader = csv.DictReader(text, restval=None)  # None: a row with fewer cells than the header
    start = 2
    try:
        repeated = _first_repeated(reader.fieldnames or ())
        if repeated is not None:
            # DictReader keeps the last cell of a name: which one was meant cannot be told.
            yield 1, Unreadable(repeated, "the header names this column twice")
            return
        for row in reader:
            yield start, _csv_item(row)
            start = reader.line_num + 1
    except csv.Error as exc:
        yield start, Unreadable("(line)", f"not valid CSV: {exc}")
    finally:
        text.detach()


def _csv_item(row: dict[str | None, Any]) -> Item:
    if None in row:
        return Unreadable("(line)", f"{len(row[None])} more cell(s) than the header has columns")
    item: dict[str, Any] = {}
    for name, cell in row.items():
        assert name is not None
        if cell is None:
            return Unreadable("(line)", "fewer cells than the header has columns")
        if not cell.isascii():
            try:
                cell.encode("utf-8")
            except UnicodeEncodeError as exc:  # a byte the file's decoding escaped (surrogateescape)
                byte = ord(cell[exc.start]) - 0xDC00
                return Unreadable(name, f"not UTF-8 text (byte 0x{byte:02x} at character {exc.start + 1})")
        if name in LIST_FIELDS:
            try:
                item[name] = json.loads(cell) if cell else []
            except json.JSONDecodeError as exc:
                return Unreadable(name, f'expected a JSON array such as ["a", "b"]: {exc.msg}')
        elif cell == "" and name in NULLABLE_FIELDS:
            item[name] = None
        else:
            item[name] = cell
    return item


def _read_parquet(stream: BinaryIO) -> Iterator[tuple[int, Item]]:
    parquet = _pyarrow_parquet("Reading Parquet files")
    source: Any = stream if stream.seekable() else io.BytesIO(stream.read())
    try:
        file = parquet.ParquetFile(source)
        repeated = _first_repeated(file.schema_arrow.names)
        if repeated is not None:
            # A row would keep one of the two values, and which one is meant cannot be told.
            raise ConfigurationError(
                f"Cannot read the Parquet file: it has two columns named {repeated}, and which one is meant "
                "cannot be told."
            )
        number = 0
        for batch in file.iter_batches(batch_size=PARQUET_READ_BATCH):
            for item in _batch_items(batch):
                number += 1
                yield number, item
    except (OSError, ValueError) as exc:
        # pyarrow's ArrowInvalid (a ValueError) and ArrowIOError (an OSError): not a Parquet file, or a damaged one.
        # Its messages may span lines; the command's error is one.
        raise ConfigurationError(f"Cannot read the Parquet file: {' '.join(str(exc).split())}") from exc


def _batch_items(batch: Any) -> list[Item]:
    """The rows of a record batch as mappings; a row holding a value Python cannot hold, as :class:`Unreadable`."""
    pa = _pyarrow("Reading Parquet files")
    failures = (ArithmeticError, ValueError, TypeError, NotImplementedError, pa.ArrowException)
    try:
        rows: list[Item] = batch.to_pylist()
        return rows
    except failures:
        pass  # a timestamp past the year 9999, say: found cell by cell below, to name its row and column
    names = batch.schema.names
    columns: list[list[Any]] = []
    for name, column in zip(names, batch.columns, strict=True):
        try:
            columns.append(column.to_pylist())
        except failures:
            columns.append([_cell(name, column, index, failures) for index in range(len(column))])
    items: list[Item] = []
    for index in range(batch.num_rows):
        row = {name: values[index] for name, values in zip(names, columns, strict=True)}
        items.append(next((value for value in row.values() if isinstance(value, Unreadable)), row))
    return items


def _cell(name: str, column: Any, index: int, failures: tuple[type[BaseException], ...]) -> Any:
    try:
        return column[index].as_py()
    except failures as exc:
        return Unreadable(name, f"cannot be read: {exc}")


def parquet_rows(stream: BinaryIO) -> int | None:
    """How many rows a seekable Parquet file holds (from its footer), for a progress bar; else ``None``."""
    if not stream.seekable():
        return None
    parquet = _pyarrow_parquet("Reading Parquet files")
    try:
        rows = parquet.ParquetFile(stream).metadata.num_rows
    except (OSError, ValueError):
        rows = None
    stream.seek(0)
    return None if rows is None else int(rows)


# -- writing --------------------------------------------------------------------------------------------------


class TraceWriter(Protocol):
    """Writes batches of traces to a file, and its end when closed."""

    def write(self, traces: Sequence[LLMTrace]) -> None: ...

    def close(self) -> None: ...


def open_writer(out: BinaryIO, format_name: str) -> TraceWriter:
    """A writer of traces in ``format_name`` to ``out`` (a binary stream; closing the writer does not close it)."""
    if format_name == "jsonl":
        return JsonLinesWriter(out)
    if format_name == "csv":
        return CsvWriter(out)
    return ParquetWriter(out)


class JsonLinesWriter:
    """One JSON object per line, as the model serialises itself."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, traces: Sequence[LLMTrace]) -> None:
        self._out.write(b"".join(trace.model_dump_json().encode() + b"\n" for trace in traces))

    def close(self) -> None:
        self._out.flush()


class CsvWriter:
    """A header row, then one row per trace (see the module's notes on empty cells)."""

    def __init__(self, out: BinaryIO) -> None:
        self._text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow(CLICKHOUSE_COLUMNS)

    def write(self, traces: Sequence[LLMTrace]) -> None:
        self._csv.writerows([_csv_cell(name, getattr(trace, name)) for name in CLICKHOUSE_COLUMNS] for trace in traces)

    def close(self) -> None:
        self._text.flush()
        self._text.detach()


def _csv_cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in LIST_FIELDS:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class ParquetWriter:
    """A Parquet file of :data:`PARQUET_SCHEMA`, one row group per batch."""

    def __init__(self, out: BinaryIO) -> None:
        self._pa = _pyarrow("Writing Parquet files")
        parquet = _pyarrow_parquet("Writing Parquet files")
        self._schema = parquet_schema()
        self._writer = parquet.ParquetWriter(out, self._schema, compression="zstd")

    def write(self, traces: Sequence[LLMTrace]) -> None:
        if traces:
            rows = [trace.model_dump() for trace in traces]
            self._writer.write_table(self._pa.Table.from_pylist(rows, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


def parquet_schema() -> Any:
    """The Parquet columns of a trace: the table's columns, in its order, with its types."""
    pa = _pyarrow("Writing Parquet files")
    string, uint32, uint64 = pa.string(), pa.uint32(), pa.uint64()
    types = {
        "agent_tags": pa.list_(string),
        "is_byok": pa.bool_(),
        "is_error": pa.bool_(),
        "request_size_bytes": uint64,
        "response_size_bytes": uint64,
        "prompt_tokens": uint32,
        "completion_tokens": uint32,
        "total_tokens": uint32,
        "cached_input_tokens": uint32,
        "cache_write_tokens": uint32,
        "reasoning_tokens": uint32,
        "latency_ms": uint32,
        "created_at": pa.timestamp("us", tz="UTC"),
    }
    return pa.schema(
        [pa.field(name, types.get(name, string), nullable=name in NULLABLE_FIELDS) for name in CLICKHOUSE_COLUMNS]
    )


def _pyarrow(feature: str) -> Any:
    try:
        import pyarrow
    except ImportError as exc:
        raise ExtraNotInstalled("pyarrow", extra="reports", feature=feature) from exc
    return pyarrow


def _pyarrow_parquet(feature: str) -> Any:
    _pyarrow(feature)
    import pyarrow.parquet

    return pyarrow.parquet


class ByteCounter(io.RawIOBase):
    """A binary stream passed through unchanged, counting the bytes read (a progress bar's measure)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)
