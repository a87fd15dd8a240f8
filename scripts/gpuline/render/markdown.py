"""Markdown that GitHub renders in job summaries and PR comments: tables and mermaid charts.

The one place cells and labels are escaped, so a value with ``|`` or a newline never breaks a table
and a label never ends a mermaid line early.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from gpuline import gha
from gpuline.runs import RunRecord


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], align: Sequence[Literal["l", "r", "c"]] = ()
) -> str:
    """A GitHub-flavoured markdown table; ``|`` and newlines inside cells are escaped."""
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    rule = [marks[align[i]] if i < len(align) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _mermaid_text(value: str) -> str:
    # Mermaid has no escaping for these inside labels; they would end the label or the line.
    return re.sub(r"[:;#\n\r\"]", " ", value).strip() or "-"


@dataclass(frozen=True)
class Span:
    """One bar of a timeline: a step of a run, from start to end."""

    label: str
    start: datetime
    end: datetime
    status: Literal["done", "active", "crit"] = "done"


def mermaid_gantt(title: str, spans: Sequence[Span], section: str = "run") -> str:
    """A mermaid gantt chart of the run's steps (GitHub renders ```mermaid blocks in summaries and comments)."""
    lines = [
        "```mermaid",
        "gantt",
        f"    title {_mermaid_text(title)}",
        "    dateFormat YYYY-MM-DDTHH:mm:ss",
        "    axisFormat %H:%M:%S",
        f"    section {_mermaid_text(section)}",
    ]
    for i, span in enumerate(spans):
        end = max(span.end, span.start)
        lines.append(
            f"    {_mermaid_text(span.label)} :{span.status}, s{i}, {span.start:%Y-%m-%dT%H:%M:%S}, "
            f"{end:%Y-%m-%dT%H:%M:%S}"
        )
    lines.append("```")
    return "\n".join(lines)


def mermaid_xychart(
    title: str,
    x_labels: Sequence[str],
    *,
    bars: Sequence[float] = (),
    line: Sequence[float] = (),
    x_label: str | None = None,
    y_label: str = "",
    y_top: float | None = None,
    fmt: str = "{:.4g}",
) -> str:
    """The one writer of mermaid xycharts: bars and/or a line over labelled x values.

    ``x_labels`` are written as given (quote text labels with :func:`quoted`); ``fmt`` formats values.
    """
    x_name = f'"{_mermaid_text(x_label)}" ' if x_label else ""
    y_range = f" 0 --> {fmt.format(y_top)}" if y_top is not None else ""
    lines = [
        "```mermaid",
        "xychart-beta",
        f'    title "{_mermaid_text(title)}"',
        f"    x-axis {x_name}[{', '.join(x_labels)}]",
        f'    y-axis "{_mermaid_text(y_label)}"{y_range}',
    ]
    if bars:
        lines.append(f"    bar [{', '.join(fmt.format(v) for v in bars)}]")
    if line:
        lines.append(f"    line [{', '.join(fmt.format(v) for v in line)}]")
    lines.append("```")
    return "\n".join(lines)


def quoted(labels: Iterable[str]) -> list[str]:
    return [f'"{_mermaid_text(label)}"' for label in labels]


def mermaid_bar_chart(title: str, bars: Sequence[tuple[str, float]], y_label: str = "USD") -> str:
    """A bar chart, e.g. estimated vs actual cost; the axis ends a fifth above the tallest bar."""
    top = max([value for _, value in bars] + [0.0]) * 1.2 or 1.0
    return mermaid_xychart(
        title, quoted(label for label, _ in bars), bars=[v for _, v in bars], y_label=y_label, y_top=top
    )


@dataclass
class Summary:
    """A job-summary block built from parts, written once with :meth:`write`."""

    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, text: str) -> Summary:
        self.parts.append(text.strip())
        return self

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> Summary:
        self.parts.append(markdown_table(headers, rows))
        return self

    def chart(self, mermaid: str) -> Summary:
        self.parts.append(mermaid)
        return self

    def render(self) -> str:
        return "\n\n".join([f"### {self.title}", *self.parts])

    def write(self) -> str:
        markdown = self.render()
        gha.append_summary(markdown)
        return markdown


def key_value_table(rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    """A two-column table of names and values (the shape most step summaries use)."""
    return markdown_table(header, list(rows))


def mermaid_line_chart(title: str, x_label: str, points: Sequence[tuple[int, float]], y_label: str) -> str:
    """A line over numbered x values, e.g. the training loss by step (sampled to about 30 points)."""
    sample = list(points[:: max(1, len(points) // 30)])
    return mermaid_xychart(
        title, [str(x) for x, _ in sample], line=[y for _, y in sample], x_label=x_label, y_label=y_label, fmt="{:.4f}"
    )


def cost_chart(records: Iterable[RunRecord], last: int) -> str:
    """The actual cost of the last ``last`` finished runs as bars, their p90 estimate as a line."""
    done = sorted((r for r in records if r.actual_usd is not None), key=lambda r: r.created_at)[-last:]
    if len(done) < 2:
        return ""
    actual = [r.actual_usd or 0.0 for r in done]
    estimated = [r.estimated_usd for r in done]
    top = max([*actual, *(e for e in estimated if e is not None)]) or 1.0
    return mermaid_xychart(
        f"Cost per run, last {len(done)} runs (USD, bars actual, line estimate p90)",
        quoted(f"{r.created_at:%m-%d} {r.run_id[-4:]}" for r in done),
        bars=actual,
        line=[e or 0.0 for e in estimated] if all(e is not None for e in estimated) else [],
        y_label="USD",
        y_top=top * 1.1,
        fmt="{:.2f}",
    )
