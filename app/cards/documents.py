"""Cards as JSON documents: reading one of any version (V1, V2, V3) as a V2 card, and writing.

Reading checks, in order: the size, that the bytes are UTF-8 JSON, how deep it nests, the
spec's JSON Schema, then Conveyor's bounds (the pydantic model). The first check that fails
raises a `CardError` naming the fields.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import ValidationError

from app.cards.convert import from_v3, upgrade_v1
from app.cards.errors import CardError, Fault, FieldIssue
from app.cards.models import CharacterCardV2, CharacterCardV3
from app.cards.schema import MAX_ISSUES, Spec, spec_issues

# A card's JSON, encoded: at most this many bytes (its base64 in a PNG is a third larger).
MAX_CARD_JSON_BYTES = 2 * 1024 * 1024
# Objects and arrays nested deeper than this (inside `extensions`, the only open place) are
# refused: no real card comes near, and every JSON reader has a limit of its own.
MAX_NESTING = 64

AnyCard = TypeVar("AnyCard", CharacterCardV2, CharacterCardV3)


def read_json_card(raw: bytes) -> CharacterCardV2:
    """The V2 card of a JSON document holding a V1, V2 or V3 card."""
    if len(raw) > MAX_CARD_JSON_BYTES:
        raise CardError(
            Fault.CARD_TOO_LARGE,
            f"the card's JSON is {len(raw)} bytes; at most {MAX_CARD_JSON_BYTES} are accepted",
        )
    return card_from_value(parse_json(raw))


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(Fault.BAD_JSON, f"not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise CardError(
            Fault.BAD_JSON, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise CardError(Fault.BAD_JSON, f"not valid JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def card_from_value(value: Any) -> CharacterCardV2:
    """The V2 card of a parsed JSON value: V2 as it is, V3 brought down, V1 upgraded."""
    if not isinstance(value, dict):
        raise CardError(
            Fault.INVALID_CARD, "a card is a JSON object", (FieldIssue("", "must be an object"),)
        )
    _check_nesting(value)
    spec = value.get("spec")
    if spec == "chara_card_v2":
        return _validated(CharacterCardV2, value, "chara_card_v2")
    if spec == "chara_card_v3":
        return from_v3(_validated(CharacterCardV3, value, "chara_card_v3"))
    if "spec" not in value:
        # A V1 card names its fields at the root, so its faults are named there too.
        return _validated(CharacterCardV2, upgrade_v1(value), "chara_card_v2", strip="data.")
    raise CardError(
        Fault.INVALID_CARD,
        "unknown card spec",
        (FieldIssue("spec", "must be chara_card_v2 or chara_card_v3 (or absent, for V1)"),),
    )


def _validated(model: type[AnyCard], value: dict[str, Any], spec: Spec, strip: str = "") -> AnyCard:
    issues = spec_issues(value, spec)
    if not issues:
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            issues = [
                FieldIssue(_path_in(value, error["loc"]), error["msg"])
                for error in exc.errors(include_url=False)[:MAX_ISSUES]
            ]
    if strip:
        issues = [FieldIssue(i.field.removeprefix(strip), i.message) for i in issues]
    raise CardError(Fault.INVALID_CARD, f"not a valid {spec} card", tuple(issues))


def _path_in(document: Any, loc: tuple[int | str, ...]) -> str:
    """The dotted path of a pydantic error's location in the document it validated. Only keys
    and indexes the document has are kept: a union's member names, which pydantic also puts
    in the location (`id.constrained-str`), are no place in the card."""
    path, node = [], document
    for part in loc:
        in_object = isinstance(node, dict) and part in node
        in_array = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_object or in_array:
            node = node[part]
            path.append(str(part))
    return ".".join(path)


def _check_nesting(value: Any) -> None:
    pending: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if len(path) > MAX_NESTING:
            raise CardError(
                Fault.INVALID_CARD,
                "the card nests too deeply",
                (FieldIssue(".".join(path[:8]) + ".…", f"nests deeper than {MAX_NESTING}"),),
            )
        if isinstance(item, dict):
            pending.extend((inner, (*path, str(key))) for key, inner in item.items())
        elif isinstance(item, list):
            pending.extend((inner, (*path, str(index))) for index, inner in enumerate(item))


def card_json(card: CharacterCardV2 | CharacterCardV3) -> bytes:
    """The card as compact UTF-8 JSON, optional fields left out when unset."""
    return card.model_dump_json().encode("utf-8")
