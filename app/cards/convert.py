"""Between the card versions: V1 (flat, TavernAI's first format) up to V2, and V2 to V3 and back.

V2 is Conveyor's card: what the API returns and what a kind produces. V3 is written beside it
in a PNG for the applications that read V3 first; a V3 card read back comes down to V2, keeping
every V2 field and dropping what only V3 has (docs/cards.md lists it).
"""

from __future__ import annotations

from typing import Any

from app.cards.models import MAX_BOOK_NUMBER, CharacterCardV2, CharacterCardV3

# A V1 card is these six strings at the root of the JSON; each defaults to the empty string.
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
# Fields of V3's data and lorebook entries that V2 has no place for.
V3_ONLY_DATA_FIELDS = (
    "group_only_greetings",
    "nickname",
    "creator_notes_multilingual",
    "source",
    "creation_date",
    "modification_date",
    "assets",
)


def upgrade_v1(card: dict[str, Any]) -> dict[str, Any]:
    """The V2 document of a V1 card: its six fields moved into `data`, V2's others defaulted.
    Other keys at the root (`avatar`, `chat`, `create_date`…) are no card fields and are left."""
    data: dict[str, Any] = {name: card.get(name, "") for name in V1_FIELDS}
    data |= {
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {},
    }
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def to_v3(card: CharacterCardV2) -> CharacterCardV3:
    """The same card as V3: no group-only greetings, no regex keys, the default assets (the
    PNG it is embedded in is its icon)."""
    return CharacterCardV3.model_validate({"data": card.data.model_dump()})


def from_v3(card: CharacterCardV3) -> CharacterCardV2:
    """The V2 card of a V3 card. A lorebook entry's string `id`, which V2 does not allow, is
    kept only when it is a number written as a string."""
    data = card.data.model_dump(exclude=set(V3_ONLY_DATA_FIELDS))
    book = data.get("character_book")
    if book is not None:
        for entry in book["entries"]:
            entry.pop("use_regex", None)
            if isinstance(entry.get("id"), str):
                number = _numeric_id(entry.pop("id"))
                if number is not None:
                    entry["id"] = number
    return CharacterCardV2.model_validate({"data": data})


def _numeric_id(value: str) -> int | None:
    return int(value) if value.isdecimal() and int(value) <= MAX_BOOK_NUMBER else None
