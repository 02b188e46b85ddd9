"""Character Card V2 and V3 as pydantic models, with Conveyor's bounds on their sizes.

The field lists follow the published specifications (Character Card V2, `chara_card_v2`, and
Character Card V3, `chara_card_v3`); the spec's shape is also shipped as a JSON Schema
(`schemas/`), which every card read is checked against first (`app.cards.schema`). These models
add what the specs leave open: how long a text may be and how many items a list may hold (the
table in docs/cards.md), so a card Conveyor reads or writes always has a bounded size.

Fields the spec makes optional are absent from the JSON when unset (never `null`); every
`extensions` object is kept whole, as the spec requires of editors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Bounds, documented in docs/cards.md. Text lengths are in characters.
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 50_000
MAX_SHORT_CHARS = 256
MAX_COMMENT_CHARS = 2_000
MAX_GREETINGS = 50
MAX_TAGS = 100
MAX_ENTRIES = 50
MAX_KEYS = 50
MAX_SOURCES = 20
MAX_ASSETS = 50
MAX_LANGUAGES = 50
# A lorebook's numbers: large enough for any real book, small enough for any JSON reader.
MAX_BOOK_NUMBER = 1_000_000_000

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Short = Annotated[str, Field(max_length=MAX_SHORT_CHARS)]
Key = Annotated[str, Field(max_length=MAX_SHORT_CHARS)]
BookNumber = Annotated[int, Field(ge=-MAX_BOOK_NUMBER, le=MAX_BOOK_NUMBER)]
Extensions = dict[str, Any]


def _absent_when_none(value: object) -> bool:
    return value is None


def optional(**constraints: Any) -> Any:
    """An optional field of the spec: absent from the JSON when unset, never `null`."""
    return Field(None, exclude_if=_absent_when_none, **constraints)


class _CardModel(BaseModel):
    # Fields no spec defines are dropped on import (a V2 card from SillyTavern also repeats
    # the V1 fields at its root); `extensions` is where applications keep their own data.
    model_config = ConfigDict(extra="ignore", json_schema_serialization_defaults_required=True)


class CharacterBookEntry(_CardModel):
    """One lorebook entry: its `content` goes into the prompt when one of its `keys` appears."""

    keys: list[Key] = Field(default_factory=list, max_length=MAX_KEYS)
    content: Text = ""
    extensions: Extensions = Field(default_factory=dict)
    enabled: bool = True
    insertion_order: BookNumber = 0
    case_sensitive: bool | None = optional()
    name: Short | None = optional()
    priority: BookNumber | None = optional()
    id: BookNumber | None = optional()
    comment: Annotated[str, Field(max_length=MAX_COMMENT_CHARS)] | None = optional()
    selective: bool | None = optional()
    secondary_keys: list[Key] | None = optional(max_length=MAX_KEYS)
    constant: bool | None = optional()
    position: Literal["before_char", "after_char"] | None = optional()


class CharacterBook(_CardModel):
    """The character's own lorebook."""

    name: Short | None = optional()
    description: Text | None = optional()
    scan_depth: Annotated[int, Field(ge=0, le=MAX_BOOK_NUMBER)] | None = optional()
    token_budget: Annotated[int, Field(ge=0, le=MAX_BOOK_NUMBER)] | None = optional()
    recursive_scanning: bool | None = optional()
    extensions: Extensions = Field(default_factory=dict)
    entries: list[CharacterBookEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)


class CharacterCardV2Data(_CardModel):
    name: Name
    description: Text = ""
    personality: Text = ""
    scenario: Text = ""
    first_mes: Text = ""
    mes_example: Text = ""
    creator_notes: Text = ""
    system_prompt: Text = ""
    post_history_instructions: Text = ""
    alternate_greetings: list[Text] = Field(default_factory=list, max_length=MAX_GREETINGS)
    character_book: CharacterBook | None = optional()
    tags: list[Short] = Field(default_factory=list, max_length=MAX_TAGS)
    creator: Short = ""
    character_version: Short = ""
    extensions: Extensions = Field(default_factory=dict)


class CharacterCardV2(_CardModel):
    """A Character Card V2 (`chara_card_v2`), as TavernAI and SillyTavern read it."""

    spec: Literal["chara_card_v2"] = "chara_card_v2"
    spec_version: Literal["2.0"] = "2.0"
    data: CharacterCardV2Data


# V3 ----------------------------------------------------------------------------------------------


class CharacterBookEntryV3(CharacterBookEntry):
    use_regex: bool = False
    # V3 allows a string id as well as a number.
    id: BookNumber | Short | None = optional()  # type: ignore[assignment]


class CharacterBookV3(CharacterBook):
    entries: list[CharacterBookEntryV3] = Field(  # type: ignore[assignment]
        default_factory=list, max_length=MAX_ENTRIES
    )


class CardAsset(_CardModel):
    type: Short
    uri: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
    name: Short
    ext: Short


class CharacterCardV3Data(CharacterCardV2Data):
    character_book: CharacterBookV3 | None = optional()  # type: ignore[assignment]
    group_only_greetings: list[Text] = Field(default_factory=list, max_length=MAX_GREETINGS)
    nickname: Short | None = optional()
    creator_notes_multilingual: dict[Short, Text] | None = optional(max_length=MAX_LANGUAGES)
    source: list[Annotated[str, Field(max_length=2_048)]] | None = optional(max_length=MAX_SOURCES)
    creation_date: Annotated[int, Field(ge=0)] | None = optional()
    modification_date: Annotated[int, Field(ge=0)] | None = optional()
    assets: list[CardAsset] | None = optional(max_length=MAX_ASSETS)


class CharacterCardV3(_CardModel):
    """A Character Card V3 (`chara_card_v3`): V2's fields and a few more."""

    spec: Literal["chara_card_v3"] = "chara_card_v3"
    spec_version: Literal["3.0"] = "3.0"
    data: CharacterCardV3Data
