"""Character cards: the Character Card V2 and V3 formats, as JSON and inside PNG portraits.

A pure library (no Flask, no database): the import endpoint and the kinds that write cards use
it. Every card is read as V2, Conveyor's card; docs/cards.md describes the formats and bounds.
"""

from app.cards.avatar import placeholder_avatar
from app.cards.convert import from_v3, to_v3, upgrade_v1
from app.cards.documents import MAX_CARD_JSON_BYTES, card_from_value, card_json, read_json_card
from app.cards.errors import CardError, Fault, FieldIssue
from app.cards.models import (
    CharacterBook,
    CharacterBookEntry,
    CharacterCardV2,
    CharacterCardV2Data,
    CharacterCardV3,
)
from app.cards.png import PNG_SIGNATURE, read_png_card, write_png_card
from app.cards.schema import spec_schema

__all__ = [
    "MAX_CARD_JSON_BYTES",
    "PNG_SIGNATURE",
    "CardError",
    "CharacterBook",
    "CharacterBookEntry",
    "CharacterCardV2",
    "CharacterCardV2Data",
    "CharacterCardV3",
    "Fault",
    "FieldIssue",
    "card_from_value",
    "card_json",
    "from_v3",
    "placeholder_avatar",
    "read_json_card",
    "read_png_card",
    "spec_schema",
    "to_v3",
    "upgrade_v1",
    "write_png_card",
]
