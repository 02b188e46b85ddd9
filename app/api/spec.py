"""Declares each API operation once: the Flask route, its pydantic request and response models,
and so its entry in the OpenAPI 3.1 document, which is generated, never written by hand.

The decorator parses and validates the body and the query string before the view runs, so a
view only ever sees valid input, and bad input becomes a 4xx problem naming the field.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, request
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

JSON = "application/json"
_RULE_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


@dataclass
class Operation:
    method: str
    rule: str
    summary: str
    endpoint: str
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    responses: dict[int, tuple[type[BaseModel] | None, str]]
    auth: bool
    tag: str
    description: str | None = None
    headers: list[dict[str, Any]] = field(default_factory=list)


class Api:
    def __init__(self, blueprint: Blueprint, title: str, version: str) -> None:
        self.blueprint = blueprint
        self.title, self.version = title, version
        self.operations: list[Operation] = []
        self.extra_schemas: list[type[BaseModel]] = []

    def operation(
        self,
        rule: str,
        method: str,
        *,
        summary: str,
        responses: dict[int, tuple[type[BaseModel] | None, str]],
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        auth: bool = True,
        tag: str = "jobs",
        headers: list[dict[str, Any]] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(view)
            def endpoint(**path_args: Any) -> Any:
                if auth:
                    authenticate()
                if query is not None:
                    path_args["query"] = parse_query(query)
                if body is not None:
                    path_args["body"] = parse_body(body)
                return view(**path_args)

            self.blueprint.add_url_rule(rule, view.__name__, endpoint, methods=[method])
            self.operations.append(
                Operation(
                    method=method.lower(),
                    rule=rule,
                    summary=summary,
                    endpoint=view.__name__,
                    body=body,
                    query=query,
                    responses=responses,
                    auth=auth,
                    tag=tag,
                    description=(view.__doc__ or "").strip() or None,
                    headers=headers or [],
                )
            )
            return endpoint

        return decorator

    # The document ----------------------------------------------------------------------------

    def document(self, prefix: str) -> dict[str, Any]:
        models: list[tuple[type[BaseModel], str]] = [(Problem, "serialization")]
        for op in self.operations:
            if op.body is not None:
                models.append((op.body, "validation"))
            if op.query is not None:
                models.append((op.query, "validation"))
            models.extend((m, "serialization") for m, _ in op.responses.values() if m)
        models.extend((m, "validation") for m in self.extra_schemas)
        refs, definitions = models_json_schema(
            list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
        )
        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            path = prefix + _RULE_PARAM.sub(r"{\2}", op.rule)
            paths.setdefault(path, {})[op.method] = self._operation_doc(op, refs)
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": definitions.get("$defs", {}),
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }

    def _operation_doc(self, op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "operationId": op.endpoint,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": [*_path_parameters(op.rule), *op.headers],
            "responses": {},
        }
        if op.description:
            doc["description"] = op.description
        if op.auth:
            doc["security"] = [{"bearer": []}]
        if op.query is not None:
            schema = op.query.model_json_schema()
            required = set(schema.get("required", []))
            for name, prop in schema.get("properties", {}).items():
                doc["parameters"].append(
                    {
                        "name": name,
                        "in": "query",
                        "required": name in required,
                        "schema": {k: v for k, v in prop.items() if k != "title"},
                        **({"description": prop["description"]} if "description" in prop else {}),
                    }
                )
        if op.body is not None:
            doc["requestBody"] = {
                "required": True,
                "content": {JSON: {"schema": refs[(op.body, "validation")]}},
            }
        problem_ref = refs[(Problem, "serialization")]
        for status, (model, description) in sorted(op.responses.items()):
            entry: dict[str, Any] = {"description": description}
            if model is not None:
                entry["content"] = {JSON: {"schema": refs[(model, "serialization")]}}
            doc["responses"][str(status)] = entry
        for status, description in _common_problems(op):
            doc["responses"].setdefault(
                str(status),
                {
                    "description": description,
                    "content": {PROBLEM_JSON: {"schema": problem_ref}},
                },
            )
        return doc


def _common_problems(op: Operation) -> list[tuple[int, str]]:
    problems = []
    if op.auth:
        problems.append((401, "Missing, unknown or revoked API key"))
    if "<" in op.rule:
        problems.append((404, "No such job for this caller"))
    if op.body is not None:
        problems += [
            (400, "Malformed JSON"),
            (413, "Body too large"),
            (415, "Body is not application/json"),
        ]
    if op.body is not None or op.query is not None:
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
    if b"\\u0000" in raw and (field := _field_with_nul(json.loads(raw))) is not None:
        raise field_problem(
            field,
            "must not contain the NUL character (\\u0000)",
            f"{field}: must not contain the NUL character",
        )
    return parsed


def _field_with_nul(value: Any, path: str = "") -> str | None:
    if isinstance(value, str):
        return (path or "body") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return inner
            if (found := _field_with_nul(item, inner)) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := _field_with_nul(item, f"{path}.{index}")) is not None:
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
