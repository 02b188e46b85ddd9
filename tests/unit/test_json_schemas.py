"""User JSON Schemas: refused at submit when a worker could not run them, and run by a validator
that cannot hang, overflow the stack or reach the network on the ones it gets anyway."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
from pydantic import ValidationError

from app.api.problems import field_errors
from app.kinds import json_schemas
from app.kinds.structured import InvalidOutput, StructuredInput, parse_and_validate
from app.llm.errors import ModelError


def obj(**keywords: Any) -> dict[str, Any]:
    return {"type": "object", **keywords}


def nested_properties(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = obj(properties={"a": schema})
    return schema


def doubling_defs(levels: int) -> dict[str, Any]:
    """Each of the $defs applies the one before twice: about 2**(levels + 1) subschemas for one
    value (`#/$defs/d8` applies 1,021)."""
    defs: dict[str, Any] = {"d0": {"minProperties": 0}}
    for n in range(1, levels + 1):
        defs[f"d{n}"] = {"allOf": [{"$ref": f"#/$defs/d{n - 1}"}, {"$ref": f"#/$defs/d{n - 1}"}]}
    return obj(**{"$defs": defs}, allOf=[{"$ref": f"#/$defs/d{levels}"}])


TREE = obj(
    properties={"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}}
)
CYCLE = obj(
    **{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    properties={"x": {"$ref": "#/$defs/a"}},
)
CATASTROPHIC = "^(a+)+$"  # exponential backtracking in Python's re on "aaa…b"


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        pytest.param(CYCLE, "input.schema.$defs.b.$ref", id="ref-cycle"),
        pytest.param(obj(allOf=[{"$ref": "#"}]), "input.schema.allOf.0.$ref", id="allOf-self"),
        pytest.param(
            obj(**{"$defs": {"n": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/n"}]}}}),
            "input.schema.$defs.n.anyOf.1.$ref",
            id="anyOf-self-in-defs",
        ),
        pytest.param(obj(**{"if": {"$ref": "#"}}), "input.schema.if.$ref", id="if-self"),
        pytest.param(
            obj(**{"$defs": {"a": {"not": {"$ref": "#/$defs/a"}}}}),
            "input.schema.$defs.a.not.$ref",
            id="not-self",
        ),
        pytest.param(
            obj(dependentSchemas={"k": {"$ref": "#"}}),
            "input.schema.dependentSchemas.k.$ref",
            id="dependentSchemas-self",
        ),
        pytest.param(
            obj(properties={"x": {"$ref": "#/$defs/missing"}}),
            "input.schema.properties.x.$ref",
            id="unresolvable",
        ),
        pytest.param(
            obj(properties={"x": {"$ref": "https://example.com/other.json"}}),
            "input.schema.properties.x.$ref",
            id="remote",
        ),
        pytest.param(
            obj(required=["x"], properties={"x": {"$ref": "#/required"}}),
            "input.schema.properties.x.$ref",
            id="ref-to-a-non-schema",
        ),
        pytest.param(
            obj(**{"$dynamicAnchor": "m"}, properties={"x": {"$dynamicRef": "#m"}}),
            "input.schema.properties.x.$dynamicRef",
            id="dynamicRef",
        ),
        pytest.param(
            obj(properties={"x": {"type": "string", "pattern": r"(a)\1"}}),
            "input.schema.properties.x.pattern",
            id="backreference",
        ),
        pytest.param(
            obj(patternProperties={"(?=a)": {}}),
            "input.schema.patternProperties.(?=a)",
            id="lookahead-in-patternProperties",
        ),
        pytest.param(
            obj(patternProperties={"^x": {}}, unevaluatedProperties=False),
            "input.schema.unevaluatedProperties",
            id="unevaluatedProperties-with-patternProperties",
        ),
        pytest.param(
            obj(properties={"x": {"$id": "http://[", "type": "string"}}),
            "input.schema.properties.x.$id",
            id="invalid-id",
        ),
        pytest.param(
            nested_properties(40),
            "input.schema" + ".properties.a" * 32,
            id="nested-too-deep",
        ),
        pytest.param(doubling_defs(12), "input.schema.$defs.d8", id="fan-out"),
        pytest.param({"type": 12}, "input.schema.type", id="not-a-json-schema"),
    ],
)
def test_a_schema_a_worker_cannot_run_is_refused_naming_the_place(
    schema: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        StructuredInput.model_validate({"prompt": "x", "schema": schema})
    errors = field_errors(refused.value, prefix="input")
    assert [e.field for e in errors] == [field]
    place = json_schemas.pointer(tuple(field.split(".")[2:]))
    assert errors[0].message.startswith(f"{place}: "), "the message names the place too"


def test_a_cycle_is_refused_with_its_members_named() -> None:
    with pytest.raises(json_schemas.SchemaRefused) as refused:
        json_schemas.check_schema(CYCLE)
    assert refused.value.path == ("$defs", "b", "$ref")
    assert "#/$defs/a → #/$defs/b → #/$defs/a" in str(refused.value)


def test_a_pattern_refusal_says_why() -> None:
    with pytest.raises(json_schemas.SchemaRefused, match="invalid escape sequence"):
        json_schemas.check_schema(obj(properties={"x": {"pattern": r"(a)\1"}}))


@pytest.mark.parametrize(
    "schema",
    [
        pytest.param(TREE, id="tree"),
        pytest.param(
            obj(
                **{
                    "$defs": {
                        "a": obj(properties={"b": {"$ref": "#/$defs/b"}}),
                        "b": obj(properties={"a": {"$ref": "#/$defs/a"}}),
                    }
                },
                properties={"a": {"$ref": "#/$defs/a"}},
            ),
            id="mutual-recursion-through-properties",
        ),
        pytest.param(
            obj(
                **{"$defs": {"point": {"$anchor": "pt", "type": "string"}}},
                properties={"x": {"$ref": "#pt"}},
            ),
            id="anchor",
        ),
        pytest.param(
            obj(
                **{
                    "$id": "https://example.com/root.json",
                    "$defs": {"p": {"$id": "point.json", "type": "string"}},
                },
                properties={"x": {"$ref": "point.json"}},
            ),
            id="embedded-resource",
        ),
        pytest.param(
            obj(**{"$defs": {"t": True}}, properties={"x": {"$ref": "#/$defs/t"}}), id="ref-to-true"
        ),
        pytest.param(doubling_defs(7), id="fan-out-of-511"),
        pytest.param(nested_properties(31), id="31-levels-of-properties"),
        pytest.param(obj(properties={"x": {"pattern": CATASTROPHIC}}), id="RE2-runs-any-pattern"),
        pytest.param(obj(properties={"x": {"pattern": r"^\p{L}+$"}}), id="RE2-syntax"),
    ],
)
def test_schemas_that_terminate_are_accepted(schema: dict[str, Any]) -> None:
    json_schemas.check_schema(schema)


def test_the_validator_follows_a_recursive_schema_to_every_level() -> None:
    output = {"name": "a", "children": [{"name": "b", "children": [{"name": 3}]}]}
    error = json_schemas.first_error(TREE, output)
    assert error is not None
    assert list(error.absolute_path) == ["children", 0, "children", 0, "name"]


@pytest.mark.parametrize(
    ("schema", "document"),
    [
        (
            obj(properties={"x": {"type": "string", "pattern": CATASTROPHIC}}),
            {"x": "a" * 100_000 + "b"},
        ),
        (
            obj(patternProperties={CATASTROPHIC: {}}, additionalProperties=False),
            {"a" * 100_000 + "b": 1},
        ),
        # The pattern runs first, on a name it does not match; `required` then fails.
        (obj(patternProperties={CATASTROPHIC: {}}, required=["x"]), {"a" * 100_000 + "b": 1}),
    ],
    ids=["pattern", "patternProperties-with-additionalProperties", "patternProperties"],
)
def test_a_catastrophic_pattern_is_matched_in_linear_time(
    schema: dict[str, Any], document: dict[str, Any]
) -> None:
    """With Python's `re` each of these would take longer than the age of the universe."""
    started = time.perf_counter()
    with pytest.raises(InvalidOutput):
        parse_and_validate(json.dumps(document), schema)
    assert time.perf_counter() - started < 1


# --- the worker's side: schemas that never went through the check, outputs that are extreme --


def assert_fails_cleanly(document: str, schema: dict[str, Any], reason: str) -> None:
    """The job fails with `output_invalid`, at once, instead of crashing the attempt."""
    with pytest.raises(ModelError) as failed:
        parse_and_validate(document, schema)
    assert failed.value.code == "output_invalid" and not failed.value.retryable
    assert reason in failed.value.message


def test_a_ref_cycle_that_skipped_the_check_fails_the_output_not_the_worker() -> None:
    assert_fails_cleanly('{"x": 1}', CYCLE, "ran out of stack")


def test_an_output_too_deep_for_the_validator_fails_cleanly() -> None:
    document = '{"children": [' * 400 + "{}" + "]}" * 400
    assert_fails_cleanly(document, TREE, "ran out of stack")


def test_an_output_too_deep_to_parse_is_invalid() -> None:
    with pytest.raises(InvalidOutput, match="nested too deeply"):
        parse_and_validate("[" * 100_000, TREE)


def test_a_check_that_grows_exponentially_stops_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accepted (it recurses through `properties`), yet each level of the output doubles the
    work: 2**40 evaluations for an output 40 levels deep."""
    branch = {"oneOf": [{"$ref": "#/$defs/n"}, {"$ref": "#/$defs/n"}]}
    schema = obj(**{"$defs": {"n": obj(properties={"c": branch})}}, properties={"c": branch})
    json_schemas.check_schema(schema)
    monkeypatch.setattr(json_schemas, "MAX_CHECK_SECONDS", 0.2)
    started = time.perf_counter()
    assert_fails_cleanly('{"c": ' * 40 + "{}" + "}" * 40, schema, "longer than 0.2 s")
    assert time.perf_counter() - started < 2


def test_a_remote_ref_is_never_fetched() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/schema.json"
        assert_fails_cleanly('{"x": 1}', obj(properties={"x": {"$ref": url}}), "Unresolvable")
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
