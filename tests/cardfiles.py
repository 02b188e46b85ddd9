"""Card files for the tests: sample cards, and PNGs assembled chunk by chunk, the way other
applications write them (SillyTavern puts its text chunks after the image data) or break them."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

from app.cards import PNG_SIGNATURE, CharacterCardV2


def full_card(name: str = "Ada Lovelace") -> CharacterCardV2:
    """A card with every field of the spec set, lorebook included, and text outside ASCII."""
    return CharacterCardV2.model_validate(
        {
            "data": {
                "name": name,
                "description": "{{char}} writes the first program — for an engine not yet built.",
                "personality": "precise, curious, poetical",
                "scenario": "London, 1843. Babbage's drawing room.",
                "first_mes": "*looks up from the notes* Ah, you came about the Engine?",
                "mes_example": "<START>\n{{user}}: What is it for?\n{{char}}: Anything 🧮.",
                "creator_notes": "Notes for people, never for the prompt.",
                "system_prompt": "Stay in character.",
                "post_history_instructions": "Keep answers short.",
                "alternate_greetings": ["Bonjour !", "こんにちは"],
                "character_book": {
                    "name": "Engine lore",
                    "description": "What she knows",
                    "scan_depth": 4,
                    "token_budget": 512,
                    "recursive_scanning": False,
                    "extensions": {"conveyor/test": True},
                    "entries": [
                        {
                            "keys": ["engine", "Analytical"],
                            "content": "The Analytical Engine: a mill and a store.",
                            "extensions": {"depth": 4, "nested": {"a": [1, None, "x"]}},
                            "enabled": True,
                            "insertion_order": 10,
                            "case_sensitive": False,
                            "name": "engine",
                            "priority": 5,
                            "id": 1,
                            "comment": "the main entry",
                            "selective": True,
                            "secondary_keys": ["Babbage"],
                            "constant": False,
                            "position": "after_char",
                        },
                        {
                            "keys": ["Bernoulli"],
                            "content": "Note G computes Bernoulli numbers.",
                            "extensions": {},
                            "enabled": False,
                            "insertion_order": 20,
                        },
                    ],
                },
                "tags": ["historical", "mathematics"],
                "creator": "conveyor-tests",
                "character_version": "1.2",
                "extensions": {"talkativeness": "0.5", "fav": False, "world": None},
            }
        }
    )


def card_document(card: CharacterCardV2) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(card.model_dump_json())
    return document


def chunk(chunk_type: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(chunk_type))
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", crc)


def text_chunk(keyword: str, text: bytes) -> bytes:
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text)


def card_text(document: Any) -> bytes:
    """A card chunk's text: base64 of the document's UTF-8 JSON."""
    return base64.b64encode(json.dumps(document, ensure_ascii=False).encode("utf-8"))


def tiny_png(*, before_image: tuple[bytes, ...] = (), after_image: tuple[bytes, ...] = ()) -> bytes:
    """A valid one-pixel grey PNG with the given chunks before and after its image data."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    return (
        PNG_SIGNATURE
        + header
        + b"".join(before_image)
        + pixels
        + b"".join(after_image)
        + chunk(b"IEND", b"")
    )
