"""`character_card`: a concept in, a Character Card V2 out, in four checkpointed steps.

- `profile` (the `creative` model, structured): name, description, personality, scenario, the
  system prompt and the creator's notes;
- `greetings` (`creative`, structured): the first message, the alternate greetings and the
  example dialogue;
- `lorebook` (the `analysis` model, structured): the entries of the character's book (skipped,
  at no cost, when none are asked for);
- `review` (`analysis`, structured): a consistency check of the assembled card, whose fixes
  are applied; the card is then validated against the Character Card V2 schema, and what
  fails is sent back once for repair.

Each finished step is a checkpoint (docs/kinds.md): an attempt lost during the lorebook resumes
there, without paying for the profile and the greetings again.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.cards import CardError, CharacterCardV2, card_from_value
from app.kinds.base import Step
from app.kinds.context import JobContext, token_progress
from app.kinds.structured import ask_for_json
from app.llm.errors import ModelError

NAME = "character_card"
DESCRIPTION = (
    "A character card (Character Card V2, as SillyTavern reads it) from a concept, in four "
    "checkpointed steps: profile and greetings (the `creative` model), lorebook and review "
    "(the `analysis` model). Download it as JSON, V2 JSON or a card PNG."
)


MAX_ENTRIES = 50
MAX_GREETINGS = 10
SHORT = 200
LONG = 4_000


class CharacterCardInput(BaseModel):
    """The generator's options; every one but the concept is optional."""

    model_config = ConfigDict(extra="forbid")

    concept: str = Field(min_length=1, max_length=LONG, description="who the character is")
    name: str | None = Field(None, min_length=1, max_length=SHORT, description="their name")
    genre: str | None = Field(None, max_length=SHORT)
    setting: str | None = Field(None, max_length=LONG, description="the setting or world")
    tone: str | None = Field(None, max_length=SHORT)
    point_of_view: Literal["first", "second", "third"] = Field(
        "third", description="the person the character's messages are written in"
    )
    language: str = Field("English", min_length=1, max_length=64)
    lorebook_entries: int = Field(8, ge=0, le=MAX_ENTRIES, description="entries in the lorebook")
    alternate_greetings: int = Field(2, ge=0, le=MAX_GREETINGS)
    content_rating: Literal["sfw", "nsfw"] = "sfw"
    tags: list[str] = Field(default_factory=list, max_length=20)
    creator: str = Field("", max_length=SHORT)
    max_tokens: int | None = Field(
        None, ge=64, le=32_768, description="limit of each step's answer"
    )
    avatar_job_id: UUID | None = Field(
        None,
        description="an `image` job whose first image is the card PNG's portrait (download)",
    )

    def brief(self) -> str:
        """The request as every step's prompt states it."""
        lines = [f"Concept: {self.concept}"]
        for label, value in (
            ("Name", self.name),
            ("Genre", self.genre),
            ("Setting", self.setting),
            ("Tone", self.tone),
        ):
            if value:
                lines.append(f"{label}: {value}")
        lines.append(f"Write in {self.language}, {self.point_of_view} person.")
        rating = "safe for work" if self.content_rating == "sfw" else "adult content allowed"
        lines.append(f"Content rating: {rating}.")
        return "\n".join(lines)


def _text(max_length: int = LONG, min_length: int = 1) -> Any:
    return Field(min_length=min_length, max_length=max_length)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = _text(SHORT)
    description: str = _text()
    personality: str = _text()
    scenario: str = _text()
    system_prompt: str = _text(min_length=0)
    creator_notes: str = _text(min_length=0)


class Greetings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first_mes: str = _text()
    alternate_greetings: list[str] = Field(max_length=MAX_GREETINGS)
    mes_example: str = _text()


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(min_length=1, max_length=10)
    content: str = _text()
    insertion_order: int = Field(ge=0, le=1_000)
    priority: int = Field(ge=0, le=1_000)
    enabled: bool


class Lorebook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[Entry] = Field(max_length=MAX_ENTRIES)


class Review(BaseModel):
    """The analysis model's check: what is inconsistent, and replacement texts for fields."""

    model_config = ConfigDict(extra="forbid")

    consistent: bool
    issues: list[str] = Field(max_length=20)
    description: str | None = Field(max_length=LONG)
    personality: str | None = Field(max_length=LONG)
    scenario: str | None = Field(max_length=LONG)
    first_mes: str | None = Field(max_length=LONG)


# Each step's output is its model, restored from the checkpoint with its fields in the model's
# order (PostgreSQL's jsonb keeps its own), so a resumed step's prompts are the same text.
STEPS = (
    Step("profile", role="creative", weight=0.3, output=Profile),
    Step("greetings", role="creative", weight=0.25, output=Greetings),
    Step("lorebook", role="analysis", weight=0.3, output=Lorebook),
    Step("review", role="analysis", weight=0.15),
)


def run(ctx: JobContext, job_input: CharacterCardInput) -> CharacterCardV2:
    profile = ctx.run_step("profile", lambda: _profile(ctx, job_input))
    greetings = ctx.run_step("greetings", lambda: _greetings(ctx, job_input, profile))
    lorebook = ctx.run_step("lorebook", lambda: _lorebook(ctx, job_input, profile))
    card = ctx.run_step("review", lambda: _review(ctx, job_input, profile, greetings, lorebook))
    return card_from_value(card)


def _ask(
    ctx: JobContext,
    job_input: CharacterCardInput,
    model: type[BaseModel],
    system: str,
    user: str,
) -> Any:
    """One structured answer of the step's model, as an instance of `model`."""
    options: dict[str, Any] = {"progress_of": token_progress(job_input.max_tokens)}
    if job_input.max_tokens is not None:
        options["max_tokens"] = job_input.max_tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    data, _repaired = ask_for_json(
        ctx, messages, model.model_json_schema(), model.__name__.lower(), **options
    )
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # the JSON Schema and the model disagree: not the model's
        raise ModelError("output_invalid", str(exc), retryable=False) from None


def _profile(ctx: JobContext, job_input: CharacterCardInput) -> Profile:
    profile = _ask(
        ctx,
        job_input,
        Profile,
        "You write characters for roleplay character cards. Answer with the character's "
        "profile as JSON: name, description (appearance and background), personality, "
        "scenario (the situation the conversation starts in), system_prompt and creator_notes.",
        job_input.brief(),
    )
    if job_input.name:
        profile.name = job_input.name
    return Profile.model_validate(profile.model_dump())


def _greetings(ctx: JobContext, job_input: CharacterCardInput, profile: Profile) -> Greetings:
    count = job_input.alternate_greetings
    schema_model = _with_exactly(Greetings, "alternate_greetings", count)
    greetings = _ask(
        ctx,
        job_input,
        schema_model,
        f"You write the opening of roleplay conversations. Answer with JSON: first_mes (the "
        f"character's first message), alternate_greetings ({count} other openings) and "
        "mes_example (example dialogue, each exchange starting with <START>, using {{char}} "
        "and {{user}}).",
        f"{job_input.brief()}\n\nProfile:\n{_profile_text(profile)}",
    )
    return Greetings.model_validate(greetings.model_dump())


def _lorebook(ctx: JobContext, job_input: CharacterCardInput, profile: Profile) -> Lorebook:
    count = job_input.lorebook_entries
    if count == 0:
        return Lorebook(entries=[])
    lorebook = _ask(
        ctx,
        job_input,
        _with_exactly(Lorebook, "entries", count),
        f"You build lorebooks for roleplay character cards. Answer with JSON: {count} entries, "
        "each with keys (the words that trigger it), content (what the model should know), "
        "insertion_order, priority and enabled.",
        f"{job_input.brief()}\n\nProfile:\n{_profile_text(profile)}",
    )
    return Lorebook.model_validate(lorebook.model_dump())


def _review(
    ctx: JobContext,
    job_input: CharacterCardInput,
    profile: Profile,
    greetings: Greetings,
    lorebook: Lorebook,
) -> dict[str, Any]:
    review = _ask(
        ctx,
        job_input,
        Review,
        "You check roleplay character cards for consistency. Answer with JSON: consistent, "
        "issues (what contradicts what), and a corrected text for description, personality, "
        "scenario or first_mes where one is needed (null where not).",
        f"{job_input.brief()}\n\nProfile:\n{_profile_text(profile)}\n\n"
        f"First message:\n{greetings.first_mes}",
    )
    if review.issues:
        ctx.log("review", issues=review.issues, consistent=review.consistent)
    fixes = {
        field: value
        for field in ("description", "personality", "scenario", "first_mes")
        if (value := getattr(review, field))
    }
    card = _assemble(job_input, profile, greetings, lorebook, fixes)
    try:
        card_from_value(card)
    except CardError as exc:
        raise ModelError(
            "output_invalid", f"the card is not valid: {exc}", retryable=False
        ) from None
    return card


def _assemble(
    job_input: CharacterCardInput,
    profile: Profile,
    greetings: Greetings,
    lorebook: Lorebook,
    fixes: dict[str, str],
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": profile.name,
        "description": profile.description,
        "personality": profile.personality,
        "scenario": profile.scenario,
        "first_mes": greetings.first_mes,
        "mes_example": greetings.mes_example,
        "creator_notes": profile.creator_notes,
        "system_prompt": profile.system_prompt,
        "post_history_instructions": "",
        "alternate_greetings": greetings.alternate_greetings,
        "tags": job_input.tags,
        "creator": job_input.creator,
        "character_version": "1.0",
        "extensions": {"conveyor": {"concept": job_input.concept}},
        **fixes,
    }
    if lorebook.entries:
        data["character_book"] = {
            "name": f"{profile.name}'s lorebook",
            "extensions": {},
            "entries": [
                {**entry.model_dump(), "id": number, "extensions": {}}
                for number, entry in enumerate(lorebook.entries, start=1)
            ],
        }
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def _with_exactly(model: type[BaseModel], field: str, count: int) -> type[BaseModel]:
    """`model` whose list `field` has exactly `count` items, in its JSON Schema too."""
    annotation = model.model_fields[field].annotation
    return type(
        model.__name__,
        (model,),
        {
            "__annotations__": {field: annotation},
            field: Field(min_length=count, max_length=count),
        },
    )


def _profile_text(profile: Profile) -> str:
    return "\n".join(f"{key}: {value}" for key, value in profile.model_dump().items() if value)


Input = CharacterCardInput
Output = CharacterCardV2
