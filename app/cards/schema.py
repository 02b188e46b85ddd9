"""The specifications' JSON Schemas, shipped in `schemas/`, and checking a document against them.

A card is checked twice: against its spec's JSON Schema (the shape every reader of the format
expects: types, required fields, fixed values), then by the pydantic model (Conveyor's bounds on
sizes). The schemas are data files so that other programs can use them too.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Literal

from jsonschema import Draft202012Validator, ValidationError

from app.cards.errors import FieldIssue

Spec = Literal["chara_card_v2", "chara_card_v3"]
SCHEMA_FILES: dict[Spec, str] = {
    "chara_card_v2": "chara_card_v2.schema.json",
    "chara_card_v3": "chara_card_v3.schema.json",
}
# A card with more faults than this is reported by its first ones.
MAX_ISSUES = 20


@functools.cache
def spec_schema(spec: Spec) -> dict[str, Any]:
    """The JSON Schema of `spec`, as shipped in the package."""
    text = resources.files("app.cards").joinpath("schemas", SCHEMA_FILES[spec]).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator(spec: Spec) -> Draft202012Validator:
    return Draft202012Validator(spec_schema(spec))


def spec_issues(document: Any, spec: Spec) -> list[FieldIssue]:
    """Where `document` departs from the JSON Schema of `spec`, by field; empty if it conforms."""
    issues: dict[FieldIssue, None] = {}
    for error in sorted(_validator(spec).iter_errors(document), key=_error_order):
        issues.update(dict.fromkeys(_issues_of(error)))
        if len(issues) >= MAX_ISSUES:
            break
    return list(issues)[:MAX_ISSUES]


def _error_order(error: ValidationError) -> tuple[str, ...]:
    return tuple(str(part) for part in error.absolute_path)


def _issues_of(error: ValidationError) -> list[FieldIssue]:
    path = [str(part) for part in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        # One issue per missing property, named by its own path rather than its parent's.
        missing = [name for name in error.validator_value if name not in error.instance]
        return [FieldIssue(".".join([*path, name]), "is required") for name in missing]
    return [FieldIssue(".".join(path), _message(error))]


def _message(error: ValidationError) -> str:
    # jsonschema's own messages quote the offending value, which may be a 50,000-character text.
    expected = error.validator_value
    if error.validator == "type":
        names = expected if isinstance(expected, list) else [expected]
        return "must be " + " or ".join(_TYPE_NAMES.get(name, name) for name in names)
    if error.validator == "const":
        return f"must be {json.dumps(expected)}"
    if error.validator == "enum":
        return "must be one of " + ", ".join(json.dumps(value) for value in expected)
    return error.message[:200]


_TYPE_NAMES = {
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "object": "an object",
    "array": "an array",
}
