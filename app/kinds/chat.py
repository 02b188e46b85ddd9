"""`chat`: a prompt or messages in, streamed text out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.kinds.base import PromptInput
from app.kinds.context import JobContext, token_progress

NAME = "chat"
DESCRIPTION = "A chat completion: streams tokens as it writes; the output is the text."


class ChatInput(PromptInput):
    pass


class ChatOutput(BaseModel):
    text: str
    finish_reason: str | None = None


def run(ctx: JobContext, job_input: ChatInput) -> ChatOutput:
    completion = ctx.llm.chat(
        job_input.as_messages(),
        progress_of=token_progress(job_input.max_tokens),
        **job_input.call_options(),
    )
    return ChatOutput(text=completion.text, finish_reason=completion.finish_reason)


def batch_request(job_input: ChatInput) -> dict[str, Any]:
    return job_input.batch_body()


def batch_result(job_input: ChatInput, text: str, finish_reason: str | None) -> ChatOutput:
    return ChatOutput(text=text, finish_reason=finish_reason)


Input = ChatInput
Output = ChatOutput
