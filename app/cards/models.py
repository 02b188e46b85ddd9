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

from typing import Annotated, Any, Literal, TypeVar

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
Url = Annotated[str, Field(max_length=2_048)]
BookNumber = Annotated[int, Field(ge=-MAX_BOOK_NUMBER, le=MAX_BOOK_NUMBER)]
Extensions = dict[str, Any]


T = TypeVar("T")


def _absent_when_none(value: object) -> bool:
    return value is None


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


# An optional field of the spec: absent from the JSON when unset, never `null` (null is no
# value the specs allow, so it is not one of the field's types either). Declared
# `name: Absent[Short] = None`; the default is the only None it holds.
Absent = Annotated[T, Field(exclude_if=_absent_when_none, json_schema_extra=_no_default)]


class _CardModel(BaseModel):
    # Fields no spec defines are dropped on import (a V2 card from SillyTavern also repeats
    # the V1 fields at its root); `extensions` is where applications keep their own data.
    model_config = ConfigDict(extra="ignore")


class CharacterBookEntry(_CardModel):
    """One lorebook entry: its `content` goes into the prompt when one of its `keys` appears."""

    keys: list[Key] = Field(default_factory=list, max_length=MAX_KEYS)
    content: Text = ""
    extensions: Extensions = Field(default_factory=dict)
    enabled: bool = True
    insertion_order: BookNumber = 0
    case_sensitive: Absent[bool] = None
    name: Absent[Short] = None
    priority: Absent[BookNumber] = None
    id: Absent[BookNumber] = None
    comment: Absent[Annotated[str, Field(max_length=MAX_COMMENT_CHARS)]] = None
    selective: Absent[bool] = None
    secondary_keys: Absent[Annotated[list[Key], Field(max_length=MAX_KEYS)]] = None
    constant: Absent[bool] = None
    position: Absent[Literal["before_char", "after_char"]] = None


class CharacterBook(_CardModel):
    """The character's own lorebook."""

    name: Absent[Short] = None
    description: Absent[Text] = None
    scan_depth: Absent[Annotated[int, Field(ge=0, le=MAX_BOOK_NUMBER)]] = None
    token_budget: Absent[Annotated[int, Field(ge=0, le=MAX_BOOK_NUMBER)]] = None
    recursive_scanning: Absent[bool] = None
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
    character_book: Absent[CharacterBook] = None
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
    id: Absent[BookNumber | Short] = None  # type: ignore[assignment]


class CharacterBookV3(CharacterBook):
    entries: list[CharacterBookEntryV3] = Field(  # type: ignore[assignment]
        default_factory=list, max_length=MAX_ENTRIES
    )


class CardAsset(_CardModel):
    type: Short
    # A URL, `embeded://path`, `ccdefault:` or a data URL of the asset itself.
    uri: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
    name: Short
    ext: Short


class CharacterCardV3Data(CharacterCardV2Data):
    character_book: Absent[CharacterBookV3] = None  # type: ignore[assignment]
    group_only_greetings: list[Text] = Field(default_factory=list, max_length=MAX_GREETINGS)
    nickname: Absent[Short] = None
    creator_notes_multilingual: Absent[
        Annotated[dict[Short, Text], Field(max_length=MAX_LANGUAGES)]
    ] = None
    source: Absent[Annotated[list[Url], Field(max_length=MAX_SOURCES)]] = None
    creation_date: Absent[Annotated[int, Field(ge=0)]] = None
    modification_date: Absent[Annotated[int, Field(ge=0)]] = None
    assets: Absent[Annotated[list[CardAsset], Field(max_length=MAX_ASSETS)]] = None


class CharacterCardV3(_CardModel):
    """A Character Card V3 (`chara_card_v3`): V2's fields and a few more."""

    spec: Literal["chara_card_v3"] = "chara_card_v3"
    spec_version: Literal["3.0"] = "3.0"
    data: CharacterCardV3Data
