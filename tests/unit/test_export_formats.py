"""The export writers: whatever text PostgreSQL can hold comes back unchanged through the
standard readers (json, yaml.safe_load, csv)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api import export_formats as formats
from app.api.schemas import JobOut

# What a jsonb value can hold: text without NUL and without lone surrogates.
STORABLE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | STORABLE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STORABLE_TEXT, inner, max_size=4),
    max_leaves=12,
)
AWKWARD = [
    "",
    "a,b",
    'say "hi"',
    "one\ntwo",
    "cr\rlf\r\n",
    "\u2028\u2029\x85",
    "null",
    "yes",
    "- item",
    "# not a comment",
    "漢字 🚀",
    "  padded  ",
    "1.50",
    "'quoted'",
    "a long line " * 40 + "\n  indented  \n",
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(STORABLE_TEXT, JSON_VALUES, max_size=6))
def test_yaml_and_json_lines_read_back_unchanged(document: dict[str, Any]) -> None:
    assert yaml.safe_load(formats.yaml_text(document)) == document
    line = formats.json_line(document)
    assert line.endswith("\n") and len(line.splitlines()) == 1
    assert json.loads(line) == document


@settings(max_examples=300, deadline=None)
@given(st.lists(STORABLE_TEXT, min_size=1, max_size=5), st.integers(1, 4))
def test_csv_text_reads_back_cell_for_cell(texts: list[str], count: int) -> None:
    records = [{f"c{i}": text for i, text in enumerate(texts)} for _ in range(count)]
    columns = list(records[0])
    written = formats.csv_text(formats.csv_row(record, columns) for record in records)
    read = list(csv.reader(io.StringIO(written, newline="")))
    assert read == [[formats.cell(text) for text in texts]] * count


def test_awkward_text_survives_every_format() -> None:
    document = {text or "empty": text for text in AWKWARD}
    assert yaml.safe_load(formats.yaml_text(document)) == document
    assert json.loads(formats.json_line(document)) == document
    [row] = csv.reader(io.StringIO(formats.csv_text([list(document.values())]), newline=""))
    assert row == AWKWARD


def test_cells() -> None:
    assert formats.cell(None) == "" and formats.cell(True) == "true"
    assert formats.cell(0) == "0" and formats.cell(2.5) == "2.5"
    assert formats.cell({"a": [1, None, "é"]}) == '{"a":[1,null,"é"]}'
    # What a spreadsheet would run as a formula is kept as text.
    for formula in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"]:
        assert formats.cell(formula) == "'" + formula
    assert formats.cell("a=1") == "a=1"
    assert formats.cell(-1) == "-1"  # a number, not text


def test_the_job_columns_follow_the_job_model() -> None:
    assert formats.JOB_COLUMNS[:3] == ["id", "kind", "status"]
    assert {"error.code", "error.message", "usage.tokens_in", "usage.cost_usd"} <= set(
        formats.JOB_COLUMNS
    )
    assert "error" not in formats.JOB_COLUMNS and "links.self" not in formats.JOB_COLUMNS
    # error, usage, waiting and links flattened (links left out): 2, 3 and 3 columns.
    assert len(formats.JOB_COLUMNS) == len(JobOut.model_fields) - 4 + 2 + 3 + 3
    assert {"waiting.reason", "waiting.endpoint", "waiting.until"} <= set(formats.JOB_COLUMNS)
    # A nested value that is null leaves its columns empty.
    record = {"error": None, "usage": {"tokens_in": 3}}
    assert formats.csv_row(record, ["error.code", "usage.tokens_in"]) == ["", "3"]
