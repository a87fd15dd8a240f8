"""Markdown for summaries and comments: escaped tables, mermaid charts, the summary builder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuline.render import markdown

# ---------------------------------------------------------------- rendering


def test_markdown_table_escapes_pipes_and_newlines() -> None:
    table = markdown.markdown_table(["what", "value"], [["a|b", "line1\nline2"], ["cost", 1.5]], align=["l", "r"])
    assert table.splitlines() == [
        "| what | value |",
        "| :--- | ---: |",
        "| a\\|b | line1<br>line2 |",
        "| cost | 1.5 |",
    ]


def test_markdown_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="2 columns"):
        markdown.markdown_table(["a", "b"], [["only one"]])


def test_mermaid_gantt_has_one_bar_per_step_and_no_label_breakers() -> None:
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    chart = markdown.mermaid_gantt(
        "run r-1",
        [
            markdown.Span("provision: g5", t0, t0 + timedelta(seconds=90)),
            markdown.Span("train", t0 + timedelta(seconds=90), t0 + timedelta(minutes=20), "active"),
        ],
    )
    lines = chart.splitlines()
    assert lines[0] == "```mermaid" and lines[1] == "gantt" and lines[-1] == "```"
    assert "    provision  g5 :done, s0, 2026-01-02T03:04:05, 2026-01-02T03:05:35" in lines
    assert any(line.startswith("    train :active, s1,") for line in lines)


def test_mermaid_bar_chart_scales_the_axis_above_the_tallest_bar() -> None:
    chart = markdown.mermaid_bar_chart("cost", [("estimate", 2.0), ("actual", 1.5)])
    assert 'x-axis ["estimate", "actual"]' in chart
    assert "bar [2, 1.5]" in chart
    assert 'y-axis "USD" 0 --> 2.4' in chart


def test_summary_writes_title_table_and_chart(actions_env: dict[str, Path]) -> None:
    text = (
        markdown.Summary("gpuline teardown")
        .text("Released.")
        .table(["", "USD"], [["estimate", "2.00"], ["actual", "1.50"]])
        .chart(markdown.mermaid_bar_chart("cost", [("estimate", 2.0), ("actual", 1.5)]))
        .write()
    )
    written = actions_env["GITHUB_STEP_SUMMARY"].read_text()
    assert written.startswith("### gpuline teardown")
    assert text.strip() in written
    assert "| actual | 1.50 |" in written and "```mermaid" in written
