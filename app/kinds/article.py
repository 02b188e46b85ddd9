"""`article`: a topic in, an article out, in three checkpointed steps.

`outline` plans it with the `analysis` role's model, `draft` writes it with the `creative`
role's, and `edit` revises the draft (with the editing notes, if any) into the final text, the
one part streamed as it is written. Each finished step is a checkpoint: an attempt that fails
or is lost during the edit resumes at the edit, without paying for the outline or the draft
again. docs/kinds.md walks through this module.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.kinds.base import MAX_PROMPT_CHARS, Step
from app.kinds.context import JobContext, token_progress

NAME = "article"
DESCRIPTION = (
    "An article on a topic, in three checkpointed steps: an outline (the `analysis` model), "
    "a draft (the `creative` model) and an edit (the `creative` model, streamed)."
)

STEPS = (
    Step("outline", role="analysis", weight=0.2),
    Step("draft", role="creative", weight=0.5),
    Step("edit", role="creative", weight=0.3),
)


class ArticleInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to write about")
    audience: str | None = Field(None, max_length=2_000, description="who it is for")
    edit_notes: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="what the final edit should change"
    )
    max_tokens: int | None = Field(None, ge=1, le=32_768, description="limit of each step")


class ArticleOutput(BaseModel):
    outline: str
    draft: str
    text: str = Field(description="the edited article")


def run(ctx: JobContext, job_input: ArticleInput) -> ArticleOutput:
    outline = ctx.run_step("outline", lambda: _outline(ctx, job_input))
    draft = ctx.run_step("draft", lambda: _draft(ctx, job_input, outline))
    text = ctx.run_step("edit", lambda: _edit(ctx, job_input, draft))
    return ArticleOutput(outline=outline, draft=draft, text=text)


def _ask(ctx: JobContext, job_input: ArticleInput, system: str, user: str, stream: bool) -> str:
    options = {} if job_input.max_tokens is None else {"max_tokens": job_input.max_tokens}
    completion = ctx.llm.chat(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        stream_deltas=stream,
        progress_of=token_progress(job_input.max_tokens),
        **options,
    )
    return completion.text


def _outline(ctx: JobContext, job_input: ArticleInput) -> str:
    audience = f"\nAudience: {job_input.audience}" if job_input.audience else ""
    return _ask(
        ctx,
        job_input,
        "You plan articles. Answer with a short numbered outline and nothing else.",
        f"Topic: {job_input.topic}{audience}",
        stream=False,
    )


def _draft(ctx: JobContext, job_input: ArticleInput, outline: str) -> str:
    return _ask(
        ctx,
        job_input,
        "You write articles. Follow the outline; answer with the article only.",
        f"Topic: {job_input.topic}\n\nOutline:\n{outline}",
        stream=False,
    )


def _edit(ctx: JobContext, job_input: ArticleInput, draft: str) -> str:
    notes = f"\n\nEditing notes: {job_input.edit_notes}" if job_input.edit_notes else ""
    return _ask(
        ctx,
        job_input,
        "You edit articles: tighten the prose, fix errors, keep the structure. Answer with the "
        "edited article only.",
        f"Article:\n{draft}{notes}",
        stream=True,
    )


Input = ArticleInput
Output = ArticleOutput
