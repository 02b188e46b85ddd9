"""`structured`: a prompt plus a JSON Schema in, a JSON document that validates against it out.

Models sometimes return JSON that does not parse or does not match. One repair call shows the
model its answer and the validation error; if that fails too, the job fails with
`output_invalid` (retrying the same prompt would most likely fail the same way, and cost again).
The schema is the user's, so it is checked at submit and run with a bounded validator
(`app.kinds.json_schemas`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from app.kinds import json_schemas
from app.kinds.base import PromptInput
from app.kinds.context import JobContext, token_progress
from app.llm.errors import ModelError

NAME = "structured"
DESCRIPTION = "A JSON document that validates against the JSON Schema you give."


class StructuredInput(PromptInput):
    json_schema: dict[str, Any] = Field(
        alias="schema",
        description=(
            "A JSON Schema (2020-12) for the output; its root must be an object. $refs only "
            "inside it and no $ref cycle that does not descend into the value; patterns in "
            f"RE2 syntax; at most {json_schemas.MAX_SCHEMA_CHARS:,} characters and "
            f"{json_schemas.MAX_NESTING} levels of nesting."
        ),
    )
    schema_name: str = Field("output", pattern=r"^[A-Za-z0-9_-]{1,64}$")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("json_schema")
    @classmethod
    def _runnable_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            json_schemas.check_schema(schema)
        except json_schemas.SchemaRefused as refused:
            # `within` extends the error's field path into the schema (app.api.problems).
            raise PydanticCustomError(
                "json_schema_refused",
                "{refused}",
                {"refused": str(refused), "within": list(refused.path)},
            ) from None
        if schema.get("type") != "object":
            raise ValueError('the schema\'s root must be {"type": "object", ...}')
        return schema


class StructuredOutput(BaseModel):
    data: dict[str, Any]
    repaired: bool = False


class InvalidOutput(ValueError):
    pass


def run(ctx: JobContext, job_input: StructuredInput) -> StructuredOutput:
    data, repaired = ask_for_json(
        ctx,
        job_input.as_messages(),
        job_input.json_schema,
        job_input.schema_name,
        progress_of=token_progress(job_input.max_tokens),
        **job_input.call_options(),
    )
    return StructuredOutput(data=data, repaired=repaired)


def ask_for_json(
    ctx: JobContext,
    messages: list[dict[str, Any]],
    schema: dict[str, Any],
    name: str,
    **options: Any,
) -> tuple[dict[str, Any], bool]:
    """A document from the model that validates against `schema`, and whether it took the one
    repair call; `ModelError("output_invalid")` when the repair fails too. `options` go to
    `ctx.llm.chat` (the repair call does not stream its deltas)."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": True},
    }
    completion = ctx.llm.chat(messages, response_format=response_format, **options)
    try:
        return parse_and_validate(completion.text, schema), False
    except InvalidOutput as error:
        first_error = error
    ctx.log(
        "the model's JSON was invalid; asking it to repair", level="warning", error=str(first_error)
    )
    repair = [
        *messages,
        {"role": "assistant", "content": completion.text},
        {
            "role": "user",
            "content": (
                f"That answer was not valid: {first_error}. Reply again with only a JSON "
                "document that matches the schema."
            ),
        },
    ]
    options.pop("progress_of", None)
    options["stream_deltas"] = False
    repaired = ctx.llm.chat(repair, response_format=response_format, **options)
    try:
        return parse_and_validate(repaired.text, schema), True
    except InvalidOutput as second_error:
        raise ModelError(
            "output_invalid",
            f"the model's output did not match the schema after one repair: {second_error}",
            retryable=False,
        ) from None


def parse_and_validate(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The model's answer as a document that matches `schema`.

    Raises `InvalidOutput` for an answer worth one repair, and `ModelError("output_invalid")`
    when the answer cannot even be checked (nested too deeply for the validator, or too costly
    to check against this schema): asking again would cost a call for the same outcome.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"not JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise InvalidOutput("the JSON is nested too deeply to read") from None
    try:
        error = json_schemas.first_error(schema, document)
    except json_schemas.OutputUncheckable as exc:
        raise ModelError(
            "output_invalid",
            f"the model's output could not be checked against the schema: {exc}",
            retryable=False,
        ) from None
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise InvalidOutput(f"at {where}: {error.message}")
    if not isinstance(document, dict):
        raise InvalidOutput("the root is not an object")
    return document


def batch_request(job_input: StructuredInput) -> dict[str, Any]:
    return job_input.batch_body() | {"response_format": _response_format(job_input)}


def batch_result(
    job_input: StructuredInput, text: str, finish_reason: str | None
) -> StructuredOutput:
    """The batch's answer, which must validate as it is: a repair would be another call,
    and another day's wait, so an invalid answer fails the job `output_invalid`."""
    try:
        return StructuredOutput(data=parse_and_validate(text, job_input.json_schema))
    except InvalidOutput as error:
        raise ModelError(
            "output_invalid",
            f"the model's output did not match the schema (a batch answer is not repaired): "
            f"{error}",
            retryable=False,
        ) from None


def _response_format(job_input: StructuredInput) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": job_input.schema_name,
            "schema": job_input.json_schema,
            "strict": True,
        },
    }


Input = StructuredInput
Output = StructuredOutput
