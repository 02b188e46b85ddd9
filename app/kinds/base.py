"""What every kind shares: the registry entry and the message inputs of chat-like kinds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from app.kinds.context import JobContext

MAX_PROMPT_CHARS = 100_000


class KindError(ValueError):
    """A job whose kind or input cannot be run."""


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    Input: type[BaseModel]
    Output: type[BaseModel]
    run: Callable[[JobContext, Any], BaseModel]


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

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

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
        return options
