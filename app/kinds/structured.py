"""`structured`: a prompt plus a JSON Schema in, a JSON document that validates against it out.

Models sometimes return JSON that does not parse or does not match. One repair call shows the
model its answer and the validation error; if that fails too, the job fails with
`output_invalid` (retrying the same prompt would most likely fail the same way, and cost again).
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.context import JobContext, token_progress
from app.kinds.base import PromptInput
from app.llm.errors import ModelError

NAME = "structured"
DESCRIPTION = "A JSON document that validates against the JSON Schema you give."

MAX_SCHEMA_CHARS = 50_000


class StructuredInput(PromptInput):
    json_schema: dict[str, Any] = Field(
        alias="schema",
        description="A JSON Schema (2020-12) for the output; its root must be an object.",
    )
    schema_name: str = Field("output", pattern=r"^[A-Za-z0-9_-]{1,64}$")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the schema is larger than {MAX_SCHEMA_CHARS} characters")
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        if schema.get("type") != "object":
            raise ValueError('the schema\'s root must be {"type": "object", ...}')
        return schema


class StructuredOutput(BaseModel):
    data: dict[str, Any]
    repaired: bool = False


class InvalidOutput(ValueError):
    pass


def run(ctx: JobContext, job_input: StructuredInput) -> StructuredOutput:
    messages = job_input.as_messages()
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": job_input.schema_name,
            "schema": job_input.json_schema,
            "strict": True,
        },
    }
    options = {"response_format": response_format, **job_input.call_options()}
    completion = ctx.llm.chat(messages, progress_of=token_progress(job_input.max_tokens), **options)
    try:
        return StructuredOutput(data=parse_and_validate(completion.text, job_input.json_schema))
    except InvalidOutput as first_error:
        ctx.log(
            "the model's JSON was invalid; asking it to repair",
            level="warning",
            error=str(first_error),
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
        repaired = ctx.llm.chat(repair, stream_deltas=False, **options)
        try:
            return StructuredOutput(
                data=parse_and_validate(repaired.text, job_input.json_schema), repaired=True
            )
        except InvalidOutput as second_error:
            raise ModelError(
                "output_invalid",
                f"the model's output did not match the schema after one repair: {second_error}",
                retryable=False,
            ) from None


def parse_and_validate(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"not JSON ({exc.msg} at character {exc.pos})") from None
    error = next(iter(Draft202012Validator(schema).iter_errors(document)), None)
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise InvalidOutput(f"at {where}: {error.message}")
    if not isinstance(document, dict):
        raise InvalidOutput("the root is not an object")
    return document


Input = StructuredInput
Output = StructuredOutput
