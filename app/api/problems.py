"""RFC 9457 problem details: every error the API returns, in one shape.

`errors` lists each bad field as a dotted path (`input.prompt`, `limit`) with its message.
A validator that checks a document held in one field (a JSON Schema) names the place inside it
in its error's `ctx["within"]`, a list of keys and indexes that extends the path
(`input.schema.$defs.a.$ref`).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, json, request
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from app.batching import WaitTimedOut

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None


class ApiProblem(Exception):
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.errors = errors
        self.headers = headers or {}
        # Members of the problem's own (RFC 9457 extension members), e.g. a URL to go to.
        self.extra = extra or {}


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> Response:
    body = Problem(
        type=f"/problems/{slug}",
        title=title,
        status=status,
        detail=detail,
        instance=request.path,
        errors=errors,
    ).model_dump(exclude_none=True)
    body.update(extra or {})
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    response.headers.update(headers or {})
    return response


def field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    errors = []
    for error in exc.errors(include_url=False):
        within = error.get("ctx", {}).get("within", [])
        parts = [*(part for part in (prefix, *error["loc"]) if part != ""), *within]
        path = ".".join(str(part) for part in parts)
        errors.append(FieldError(field=path or prefix or "(body)", message=error["msg"]))
    return errors


def field_problem(field: str, message: str, detail: str | None = None) -> ApiProblem:
    """A 422 naming the one field (or header) that is wrong."""
    return ApiProblem(
        422,
        "validation-error",
        "The request is not valid",
        detail or f"{field}: {message}",
        [FieldError(field=field, message=message)],
    )


def validation_problem(exc: ValidationError, prefix: str = "") -> ApiProblem:
    errors = field_errors(exc, prefix)
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return ApiProblem(422, "validation-error", "The request is not valid", detail, errors)


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiProblem)
    def _api_problem(exc: ApiProblem) -> Response:
        return problem_response(
            exc.status, exc.slug, exc.title, exc.detail, exc.errors, exc.headers, exc.extra
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        slug = (exc.name or "error").lower().replace(" ", "-")
        response = problem_response(exc.code or 500, slug, exc.name or "Error", exc.description)
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    @app.errorhandler(WaitTimedOut)
    def _database_unavailable(exc: Exception) -> Response:
        logger.error("database unavailable: %s", exc)
        return problem_response(
            503,
            "service-unavailable",
            "The database is unavailable",
            "Try again shortly.",
            headers={"Retry-After": "5"},
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(
            500,
            "internal-error",
            "Internal error",
            "The error was logged; the request can be retried.",
        )
