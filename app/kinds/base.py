"""What every kind shares: the registry entry and the message inputs of chat-like kinds."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.config import Settings
    from app.kinds.context import JobContext

MAX_PROMPT_CHARS = 100_000
STEP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class KindError(ValueError):
    """A job whose kind or input cannot be run."""


@dataclass(frozen=True)
class Step:
    """A named step of a kind (its module's `STEPS`). A finished step's output is checkpointed,
    so a later attempt of the job reuses it instead of running the step again.

    `role` picks the step's model (`CONVEYOR_MODELS`, or the request's choice); `weight` is its
    share of the job's progress; `output`, when given, is the model its result is an instance
    of, and a reused checkpoint is validated back into it."""

    name: str
    role: str = "default"
    weight: float = 1.0
    output: type[BaseModel] | None = None

    def __post_init__(self) -> None:
        if not STEP_NAME.match(self.name):
            raise ValueError(f"step name {self.name!r} must match {STEP_NAME.pattern}")
        if not STEP_NAME.match(self.role):
            raise ValueError(f"role {self.role!r} must match {STEP_NAME.pattern}")
        if not self.weight > 0:
            raise ValueError(f"step {self.name!r}: weight must be > 0")


@dataclass(frozen=True)
class Admission:
    """What a kind's `admit` may consult about a job being submitted: the deployment's
    settings, the model the job was given, its owner, and a database session to read the
    owner's own rows (a canvas, an artifact) with."""

    settings: Settings
    model: str
    owner: str
    session: Session


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    Input: type[BaseModel]
    Output: type[BaseModel]
    run: Callable[[JobContext, Any], BaseModel]
    steps: tuple[Step, ...] = ()
    # Checks of a valid input against the deployment and the caller's data, made at submit:
    # (field under `input`, message) for each problem. A module's `admit`, if any.
    admit: Callable[[Any, Admission], list[tuple[str, str]]] | None = None
    # A kind whose input may ask for `service_tier: "batch"` (app/jobs/provider_batches.py):
    # `batch_request(input)` is the chat completion body to send (without its model) and
    # `batch_result(input, text, finish_reason)` the output made of the provider's answer.
    batch_request: Callable[[Any], dict[str, Any]] | None = None
    batch_result: Callable[[Any, str, str | None], BaseModel] | None = None

    def __post_init__(self) -> None:
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"kind {self.name!r} declares a step twice: {names}")

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles its steps name, in order of first use."""
        return tuple(dict.fromkeys(step.role for step in self.steps))


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class PromptInput(BaseModel):
    """A prompt, or a list of messages; exactly one of the two."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Sent to the model: providers that support it answer the same request "
        "the same way",
    )
    cache: bool = Field(
        False,
        strict=True,
        description="Answer from the owner's response cache when an identical call (model, "
        "messages, max_tokens, temperature, seed) was answered within its TTL; the job then "
        "costs nothing and records `cached: true`. Only with temperature 0 or a seed.",
    )
    service_tier: Literal["default", "batch"] = Field(
        "default",
        description="`batch`: sent through the provider's Batch API at half the price, with no "
        "latency promise (the provider answers within 24 hours): no tokens stream, progress "
        "shows the batch's phase and counts (docs/api.md#service-tier). Not with `cache`.",
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    @field_validator("cache")
    @classmethod
    def _cache_is_deterministic(cls, cache: bool, info: ValidationInfo) -> bool:
        # A cached answer stands in for a new one only where the caller asked for the same
        # answer every time; at a temperature above 0 it would hide the variety asked for.
        # (A field validator, not a model one, so that the error names `cache`.)
        if cache and info.data.get("temperature") != 0 and info.data.get("seed") is None:
            raise PydanticCustomError(
                "cache_not_deterministic",
                "'cache' needs 'temperature': 0 or a 'seed': a cached answer replaces a new "
                "one only where the same answer is asked for every time",
            )
        return cache

    @field_validator("service_tier")
    @classmethod
    def _batch_is_not_cached(cls, tier: str, info: ValidationInfo) -> str:
        # A batch answer arrives hours later and is never streamed: a cache hit would make the
        # tier pointless, and an answer stored from a batch would be replayed as a stream it
        # never was. (A field validator, so that the error names `service_tier`.)
        if tier == "batch" and info.data.get("cache"):
            raise PydanticCustomError(
                "batch_not_cacheable", "'service_tier': 'batch' cannot be combined with 'cache'"
            )
        return tier

    @property
    def batched(self) -> bool:
        return self.service_tier == "batch"

    def batch_body(self) -> dict[str, Any]:
        """The chat completion a provider batch sends for this input (its model aside)."""
        body: dict[str, Any] = {"messages": self.as_messages()}
        for name in ("max_tokens", "temperature", "seed"):
            if (value := getattr(self, name)) is not None:
                body[name] = value
        return body

    def as_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        if self.messages is not None:
            messages.extend(m.model_dump() for m in self.messages)
        else:
            messages.append({"role": "user", "content": self.prompt})
        return messages

    def call_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.seed is not None:
            options["seed"] = self.seed
        if self.cache:
            options["cache"] = True
        return options
