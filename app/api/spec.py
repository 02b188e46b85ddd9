"""Declares each API operation once, next to its route: its pydantic request and response models,
and so its entry in the OpenAPI 3.1 document, which is generated, never written by hand.

A view is declared with the blueprint's route decorator over `operation`:

    @bp.post("/jobs")
    @operation(summary="Create a job", body=JobCreate, responses={202: (JobOut, "Queued")})
    def create_job(body: JobCreate) -> Response: ...

`operation` parses and validates the body and the query string before the view runs, so a view
only ever sees valid input, and bad input becomes a 4xx problem naming the field. Before that,
the caller's key must hold the operation's `scope`: by default `jobs:read` for a GET and
`jobs:write` for anything else; a key without it gets a 403 naming the scope. The document
is built from the app's URL map, so it lists exactly the routes the app serves, in the order
they were registered.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from app.api.auth import authenticate
from app.api.problems import (
    PROBLEM_JSON,
    ApiProblem,
    Problem,
    field_problem,
    validation_problem,
)
from app.keys.api_keys import JOBS_READ, JOBS_WRITE

JSON = "application/json"
# JSON Lines (one JSON value per line) goes by both names.
JSON_LINES_TYPES = ("application/jsonl", "application/x-ndjson")
_RULE_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")
# Where `operation` leaves its declaration on the view it returns, for the document to find.
_OPERATION_ATTRIBUTE = "api_operation"
_IMPLICIT_METHODS = frozenset({"HEAD", "OPTIONS"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Operation:
    """What `operation` declares; the route itself (path, method) is Flask's."""

    summary: str
    endpoint: str
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    responses: dict[int, tuple[type[BaseModel] | None, str]]
    auth: bool
    tag: str
    description: str | None = None
    # The scope the caller's key needs; None: by method (reads jobs:read, writes jobs:write).
    scope: str | None = None
    headers: list[dict[str, Any]] = field(default_factory=list)
    # A body the view reads itself, by media type: a model (its schema) or a literal schema.
    content: dict[str, type[BaseModel] | dict[str, Any]] = field(default_factory=dict)
    produces: dict[int, list[str]] = field(default_factory=dict)
    body_lines: type[BaseModel] | None = None
    response_lines: dict[int, tuple[type[BaseModel], str]] = field(default_factory=dict)

    def scope_for(self, method: str) -> str:
        if self.scope is not None:
            return self.scope
        return JOBS_READ if method.upper() in _READ_METHODS else JOBS_WRITE


@dataclass(frozen=True)
class RoutedOperation:
    rule: str
    method: str
    operation: Operation


def operation(
    *,
    summary: str,
    responses: dict[int, tuple[type[BaseModel] | None, str]],
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    auth: bool = True,
    scope: str | None = None,
    tag: str = "jobs",
    headers: list[dict[str, Any]] | None = None,
    content: dict[str, type[BaseModel] | dict[str, Any]] | None = None,
    produces: dict[int, list[str]] | None = None,
    body_parser: Callable[[type[BaseModel]], Any] | None = None,
    body_lines: type[BaseModel] | None = None,
    response_lines: dict[int, tuple[type[BaseModel], str]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declares a view an API operation. Goes under the blueprint's route decorator: the route
    must register the validating wrapper this returns, not the bare view. The view's docstring,
    if any, is the operation's description.

    `body` is a JSON body parsed and validated before the view runs; `content` instead
    declares a body the view reads itself, in each media type it accepts (a model, or a
    literal schema for a non-JSON one such as an image), for the document only. `produces`
    names the media types, other than the response model's JSON, that a status may answer
    with (as text: a YAML or CSV export).

    A body that may come in another shape than `body` (JSON Lines, one `body_lines` per line)
    is parsed by `body_parser(body)`. `response_lines`: streamed JSON Lines, a model a line."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def endpoint(**path_args: Any) -> Any:
            if auth:
                authenticate(declared.scope_for(request.method))
            if query is not None:
                path_args["query"] = parse_query(query)
            if body is not None:
                path_args["body"] = (body_parser or parse_body)(body)
            return view(**path_args)

        declared = Operation(
            summary=summary,
            endpoint=view.__name__,
            body=body,
            query=query,
            responses=responses,
            auth=auth,
            scope=scope,
            tag=tag,
            description=inspect.cleandoc(view.__doc__ or "") or None,
            headers=headers or [],
            content=content or {},
            produces=produces or {},
            body_lines=body_lines,
            response_lines=response_lines or {},
        )
        setattr(endpoint, _OPERATION_ATTRIBUTE, declared)
        return endpoint

    return decorator


def routed_operations(app: Flask) -> Iterator[RoutedOperation]:
    """Every declared operation the app routes, in the order its routes were registered."""
    for rule in app.url_map.iter_rules():
        declared = getattr(app.view_functions[rule.endpoint], _OPERATION_ATTRIBUTE, None)
        if declared is None:
            continue
        for method in sorted((rule.methods or set()) - _IMPLICIT_METHODS):
            yield RoutedOperation(rule.rule, method.lower(), declared)


# The document ----------------------------------------------------------------------------------


def document(
    title: str,
    version: str,
    operations: Iterable[RoutedOperation],
    extra_schemas: Iterable[type[BaseModel]] = (),
) -> dict[str, Any]:
    """The OpenAPI document of `operations`; `extra_schemas` are models it describes though no
    operation names them."""
    routed = list(operations)
    models: list[tuple[type[BaseModel], str]] = [(Problem, "serialization")]
    for op in (r.operation for r in routed):
        if op.body is not None:
            models.append((op.body, "validation"))
        if op.query is not None:
            models.append((op.query, "validation"))
        models.extend((m, "validation") for m in op.content.values() if _is_model(m))
        models.extend((m, "serialization") for m, _ in op.responses.values() if m)
        if op.body_lines is not None:
            models.append((op.body_lines, "validation"))
        models.extend((m, "serialization") for m, _ in op.response_lines.values())
    models.extend((m, "validation") for m in extra_schemas)
    refs, definitions = models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for r in routed:
        path = _RULE_PARAM.sub(r"{\2}", r.rule)
        paths.setdefault(path, {})[r.method] = _operation_doc(r, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation_doc(routed: RoutedOperation, refs: dict[Any, Any]) -> dict[str, Any]:
    rule, op = routed.rule, routed.operation
    doc: dict[str, Any] = {
        "operationId": op.endpoint,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [*_path_parameters(rule), *op.headers],
        "responses": {},
    }
    if op.description:
        doc["description"] = op.description
    if op.auth:
        # OpenAPI 3.1 lets a non-OAuth scheme list the roles an operation needs.
        doc["security"] = [{"bearer": [op.scope_for(routed.method)]}]
    if op.query is not None:
        doc["parameters"] += _query_parameters(op.query)
    if op.body is not None:
        content = {JSON: {"schema": refs[(op.body, "validation")]}}
        if op.body_lines is not None:
            content |= _json_lines(refs[(op.body_lines, "validation")])
        doc["requestBody"] = {"required": True, "content": content}
    if op.content:
        content = {}
        for media_type, schema in op.content.items():
            content[media_type] = {
                "schema": refs[(schema, "validation")] if _is_model(schema) else schema
            }
        doc["requestBody"] = {"required": True, "content": content}
    problem_ref = refs[(Problem, "serialization")]
    for status, (model, description) in sorted(op.responses.items()):
        entry: dict[str, Any] = {"description": description}
        if model is not None:
            # A problem an operation declares itself (402 budget-exceeded) is problem+json.
            media_type = PROBLEM_JSON if model is Problem else JSON
            entry["content"] = {media_type: {"schema": refs[(model, "serialization")]}}
        for media_type in op.produces.get(status, []):
            entry.setdefault("content", {})[media_type] = {"schema": {"type": "string"}}
        doc["responses"][str(status)] = entry
    for status, (model, description) in sorted(op.response_lines.items()):
        doc["responses"][str(status)] = {
            "description": description,
            # The one media type the API sends; a request may use either name.
            "content": _json_lines(refs[(model, "serialization")], JSON_LINES_TYPES[:1]),
        }
    for status, description in _common_problems(rule, op):
        doc["responses"].setdefault(
            str(status),
            {
                "description": description,
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            },
        )
    return doc


def _is_model(schema: type[BaseModel] | dict[str, Any]) -> bool:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def _json_lines(
    line_ref: dict[str, str], media_types: tuple[str, ...] = JSON_LINES_TYPES
) -> dict[str, Any]:
    """Media types of a JSON Lines body: OpenAPI 3.1 can only call it a string, so the
    description names the schema of one line."""
    return {
        media: {
            "schema": {
                "type": "string",
                "contentMediaType": media,
                "description": f"JSON Lines: one {line_ref['$ref']} per line",
            }
        }
        for media in media_types
    }


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": {k: v for k, v in prop.items() if k != "title"},
            **({"description": prop["description"]} if "description" in prop else {}),
        }
        for name, prop in schema.get("properties", {}).items()
    ]


def _common_problems(rule: str, op: Operation) -> list[tuple[int, str]]:
    problems = []
    if op.auth:
        problems.append((401, "Missing, unknown, revoked or expired API key"))
        problems.append((403, "The API key lacks the operation's scope; `scope` names it"))
    if names := [name for _converter, name in _RULE_PARAM.findall(rule)]:
        # `job_id` -> "job": the resource the path names.
        problems.append((404, f"No such {names[0].removesuffix('_id')} for this caller"))
    if op.body is not None:
        problems += [
            (400, "Malformed JSON"),
            (413, "Body too large"),
            (
                415,
                "Body is not JSON or JSON Lines"
                if op.body_lines
                else "Body is not application/json",
            ),
        ]
    if op.content:
        if JSON in op.content:
            problems.append((400, "Malformed JSON"))
        problems.append((413, "Body too large"))
        problems.append((415, f"Body is not {' or '.join(op.content)}"))
    if op.body is not None or op.query is not None or op.content:
        problems.append((422, "A field is not valid; `errors` names it"))
    problems.append((503, "A backing service is unavailable"))
    return problems


def _path_parameters(rule: str) -> list[dict[str, Any]]:
    params = []
    for converter, name in _RULE_PARAM.findall(rule):
        schema = {"type": "string", "format": "uuid"} if converter == "uuid" else {"type": "string"}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


# Parsing ---------------------------------------------------------------------------------------


def parse_body(model: type[BaseModel]) -> BaseModel:
    if not request.is_json:
        raise ApiProblem(
            415, "unsupported-media-type", "Send JSON", "The body must be application/json."
        )
    raw = request.get_data(cache=True)
    try:
        parsed = model.model_validate_json(raw)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise ApiProblem(
                400, "malformed-json", "The body is not valid JSON", str(exc.errors()[0]["msg"])
            ) from None
        raise validation_problem(exc) from None
    # PostgreSQL stores no NUL character in text or jsonb: refuse it here, naming the field,
    # rather than fail at the INSERT. (A raw NUL byte is already invalid JSON.)
    if b"\\u0000" in raw and (field := field_with_nul(json.loads(raw))) is not None:
        raise field_problem(
            field,
            "must not contain the NUL character (\\u0000)",
            f"{field}: must not contain the NUL character",
        )
    return parsed


def field_with_nul(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) in `value` that holds a NUL character."""
    if isinstance(value, str):
        return (path or "body") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return inner
            if (found := field_with_nul(item, inner)) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := field_with_nul(item, f"{path}.{index}")) is not None:
                return found
    return None


def parse_query(model: type[BaseModel]) -> BaseModel:
    args: dict[str, Any] = {}
    for name in request.args:
        values = request.args.getlist(name)
        args[name] = values[0] if len(values) == 1 else values
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def json_response(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    response = Response(model.model_dump_json(), status=status, mimetype=JSON)
    response.headers.update(headers or {})
    return response
