"""A chart of a usage report: tokens (and cost, once rows carry one) over time, stacked by the first group key.

Drawn with matplotlib's object API on the Agg canvas (no display, no pyplot global state), as PNG or SVG by the
file's suffix. matplotlib comes with llmtrace's ``reports`` extra.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from llmtrace.errors import ConfigurationError, ExtraNotInstalled
from llmtrace.usage import UsageRow

FORMATS = (".png", ".svg")
# More series than this make a legend nobody reads; the smallest ones are added up as "other".
MAX_SERIES = 8
OTHER = "other"
NONE_LABEL = "(none)"
# Width of one bar, as a share of its bucket.
BAR_SHARE = 0.8
BUCKET_LENGTHS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "month": timedelta(days=30)}
COST_FIELD = "cost"


def require_chart_path(path: Path) -> None:
    """Raise unless ``path`` ends in a suffix the chart can be written as."""
    if path.suffix.lower() not in FORMATS:
        raise ConfigurationError(f"Cannot write a chart to {path}: the file name must end in .png or .svg.")


def has_cost(rows: Sequence[object]) -> bool:
    """Whether these rows carry a ``cost`` measure (a field of their dataclass)."""
    return bool(rows) and dataclasses.is_dataclass(rows[0]) and COST_FIELD in _field_names(rows[0])


def _field_names(row: object) -> set[str]:
    return {field.name for field in dataclasses.fields(row)}  # type: ignore[arg-type]


def write_chart(
    rows: Sequence[UsageRow],
    path: Path,
    *,
    key: str | None,
    granularity: str,
    title: str,
) -> None:
    """Write the chart of ``rows`` (which have time buckets) to ``path``.

    Args:
        rows: Usage rows with a bucket each (a report with a granularity).
        path: A ``.png`` or ``.svg`` file.
        key: The group key the bars are stacked by; ``None`` for one series.
        granularity: The rows' granularity, for the bar width and the axis label.
        title: The chart's title.

    Raises:
        ConfigurationError: The suffix is not .png or .svg, or the file cannot be written.
        ExtraNotInstalled: matplotlib is not installed.
    """
    require_chart_path(path)
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ExtraNotInstalled("matplotlib", extra="reports", feature="A usage chart (--chart)") from exc

    panels: list[tuple[str, Callable[[Any], float], Callable[[float, Any], str]]] = [
        ("total tokens", lambda row: float(row.total_tokens), _compact_number),
    ]
    if has_cost(rows):
        panels.append(("cost (USD)", lambda row: float(row.cost or Decimal(0)), _dollars))
    figure = Figure(figsize=(12, 4 + 3.2 * len(panels)), layout="constrained", dpi=100)
    figure.suptitle(title, fontsize=14, fontweight="bold")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    if not rows:
        for ax in axes:
            ax.text(0.5, 0.5, "No traces in this range", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        _save(figure, path)
        return
    for ax, (measure, value, tick) in zip(axes, panels, strict=True):
        _stacked_bars(ax, rows, key=key, granularity=granularity, value=value)
        ax.set_ylabel(measure)
        ax.yaxis.set_major_formatter(tick)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title(f"{measure} per {granularity}" + (f", by {key}" if key else ""), loc="left", fontsize=11)
    _date_axis(axes[-1], granularity)
    handles, labels = axes[0].get_legend_handles_labels()
    # Listed top to bottom as the bars are stacked: the biggest series is at the bottom of each bar.
    figure.legend(handles[::-1], labels[::-1], title=key or None, loc="outside right upper")
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    try:
        figure.savefig(path)
    except OSError as exc:
        raise ConfigurationError(f"Cannot write the chart to {path}: {exc.strerror or exc}.") from exc


def _stacked_bars(
    ax: Any, rows: Sequence[UsageRow], *, key: str | None, granularity: str, value: Callable[[Any], float]
) -> None:
    series = _series(rows, key, value)
    buckets = sorted({bucket for values in series.values() for bucket in values})
    width = BUCKET_LENGTHS[granularity] * BAR_SHARE
    bottom = dict.fromkeys(buckets, 0.0)
    colors = _colors(len(series))
    for (label, values), color in zip(series.items(), colors, strict=True):
        heights = [values.get(bucket, 0.0) for bucket in buckets]
        ax.bar(
            buckets, heights, width=width, bottom=[bottom[b] for b in buckets], align="edge", label=label, color=color
        )
        for bucket, height in zip(buckets, heights, strict=True):
            bottom[bucket] += height


def _series(
    rows: Sequence[UsageRow], key: str | None, value: Callable[[Any], float]
) -> dict[str, dict[datetime, float]]:
    """Values per series label and bucket, biggest series first, the smallest beyond MAX_SERIES as "other"."""
    sums: dict[str, dict[datetime, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        if row.bucket is None:
            raise ValueError("a usage chart needs rows with time buckets (a report with a granularity)")
        sums[_label(row, key)][row.bucket] += value(row)
    # Ranked by tokens whatever the panel, so that a series keeps its colour and place in every panel.
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[_label(row, key)] += row.total_tokens
    ranked = sorted(sums, key=lambda label: (-totals[label], label))
    if len(ranked) <= MAX_SERIES:
        return {label: sums[label] for label in ranked}
    kept = ranked[: MAX_SERIES - 1]
    other: dict[datetime, float] = defaultdict(float)
    for label in ranked[MAX_SERIES - 1 :]:
        for bucket, amount in sums[label].items():
            other[bucket] += amount
    return {**{label: sums[label] for label in kept}, OTHER: other}


def _label(row: UsageRow, key: str | None) -> str:
    if key is None:
        return "all traces"
    found = row.group[key]
    return NONE_LABEL if found is None else str(found)


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return [palette(index % 10) for index in range(count)]


def _date_axis(ax: Any, granularity: str) -> None:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_xlabel(f"{granularity} (UTC)")


def _compact_number(value: float, _position: Any = None) -> str:
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _dollars(value: float, _position: Any = None) -> str:
    return f"${value:,.2f}"
