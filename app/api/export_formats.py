"""How exports are written: the same JSON-ready records as JSON, YAML, CSV or JSON Lines, each
readable by its standard reader (`json`, `yaml.safe_load`, `csv`).

CSV is for spreadsheets, so a record is one row and a value one cell: a nested object of the
job (`error`, `usage`) becomes dotted columns (`error.code`), a free-form JSON value (`input`,
`output`, an event's `data`) one cell of compact JSON, null an empty cell. A text cell that a
spreadsheet would run as a formula (it starts with = + - @, a tab or a carriage return) gets a
leading apostrophe, which spreadsheets hide: model output is text a third party can steer.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from app.api.schemas import JobOut, TimelineEvent

JSON_TYPE = "application/json"
YAML_TYPE = "application/yaml"
CSV_TYPE = "text/csv"
JSONL_TYPE = "application/x-ndjson"

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Characters that JSON leaves unescaped but that some line readers (Python's str.splitlines,
# JavaScript before ES2019) take for line ends: escaped, so a JSON line stays one line.
_LINE_BREAKS_JSON_ALLOWS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def model_columns(model: type[BaseModel], prefix: str = "", skip: Iterable[str] = ()) -> list[str]:
    """The CSV columns of a model: its fields, a nested model's fields as dotted names."""
    columns = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        nested = _model_in(info.annotation)
        if nested is None:
            columns.append(f"{prefix}{name}")
        else:
            columns += model_columns(nested, f"{prefix}{name}.")
    return columns


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


# A job's columns: the job as the API shows it, less its links (URLs made from its id).
JOB_COLUMNS = model_columns(JobOut, skip={"links"})
EVENT_COLUMNS = model_columns(TimelineEvent)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_STARTS) else value
    return str(value)


def _pick(record: dict[str, Any], column: str) -> Any:
    value: Any = record
    for part in column.split("."):
        if value is None:
            return None
        value = value[part]
    return value


def csv_row(record: dict[str, Any], columns: Sequence[str]) -> list[str]:
    return [cell(_pick(record, column)) for column in columns]


def csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def json_line(record: dict[str, Any]) -> str:
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in _LINE_BREAKS_JSON_ALLOWS.items():
        text = text.replace(char, escaped)
    return text + "\n"


class _ExportDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, but a string holding a NEL (U+0085) is written double-quoted,
    where it is escaped: in the plain or single-quoted style PyYAML writes it raw, and reads it
    back as a space."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if "\x85" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ExportDumper.add_representer(str, _represent_str)


def yaml_text(document: dict[str, Any]) -> str:
    """YAML that `yaml.safe_load` reads back as `document` (JSON-ready values only)."""
    return yaml.dump(
        document,
        Dumper=_ExportDumper,
        allow_unicode=True,
        sort_keys=False,
        default_flow_style=False,
    )


def job_export_csv(document: dict[str, Any], call_columns: Sequence[str]) -> str:
    """A job's export (a `JobExport` as JSON-ready values) as CSV: one row per record, its
    kind in `section` (job, event, call) and its values in that section's columns (`job.*`,
    `event.*`, `call.*`); the other sections' columns are empty."""
    job_columns = [*JOB_COLUMNS, "input", "output"]
    sections = [
        ("job", job_columns),
        ("event", EVENT_COLUMNS),
        ("call", list(call_columns)),
    ]
    header = ["section"] + [f"{name}.{column}" for name, columns in sections for column in columns]
    width = {name: len(columns) for name, columns in sections}

    def row(section: str, record: dict[str, Any]) -> list[str]:
        cells = []
        for name, columns in sections:
            cells += csv_row(record, columns) if name == section else [""] * width[name]
        return [section, *cells]

    job = {**document["job"], "input": document["input"], "output": document["output"]}
    rows = [header, row("job", job)]
    rows += [row("event", event) for event in document["events"]]
    rows += [row("call", call) for call in document["model_calls"]]
    return csv_text(rows)
