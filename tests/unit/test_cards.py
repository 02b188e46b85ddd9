"""app/cards: the card formats, read and written, and every way a card file can be wrong."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from app.cards import (
    CardError,
    CharacterCardV2,
    CharacterCardV3,
    Fault,
    card_json,
    from_v3,
    placeholder_avatar,
    read_json_card,
    read_png_card,
    spec_schema,
    to_v3,
    write_png_card,
)
from app.cards.avatar import background, initials
from app.cards.documents import MAX_CARD_JSON_BYTES, MAX_NESTING
from app.cards.models import (
    MAX_ENTRIES,
    CharacterBook,
    CharacterBookEntry,
    CharacterBookEntryV3,
    CharacterBookV3,
    CharacterCardV2Data,
    CharacterCardV3Data,
)
from app.cards.png import card_texts
from app.cards.schema import spec_issues
from tests.cardfiles import card_document, card_text, full_card, text_chunk, tiny_png

CARD_PNG = write_png_card(full_card())


def fields_of(error: CardError) -> dict[str, str]:
    return {issue.field: issue.message for issue in error.issues}


def read_document(document: Any) -> CharacterCardV2:
    return read_json_card(json.dumps(document).encode())


# Writing and reading back -------------------------------------------------------------------


def test_a_png_card_reads_back_as_the_same_card() -> None:
    card = full_card()
    assert read_png_card(write_png_card(card)) == card


def test_the_png_holds_v2_in_chara_and_v3_in_ccv3_as_base64_json() -> None:
    card = full_card()
    texts = card_texts(write_png_card(card))
    chara = json.loads(base64.b64decode(texts["chara"]))
    ccv3 = json.loads(base64.b64decode(texts["ccv3"]))
    assert chara == card_document(card)
    assert ccv3["spec"] == "chara_card_v3" and ccv3["spec_version"] == "3.0"
    assert spec_issues(chara, "chara_card_v2") == []
    assert spec_issues(ccv3, "chara_card_v3") == []
    assert ccv3["data"]["group_only_greetings"] == []
    assert all(entry["use_regex"] is False for entry in ccv3["data"]["character_book"]["entries"])


def test_pillow_opens_the_png_and_sees_both_text_chunks() -> None:
    data = write_png_card(full_card())
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (400, 600)
        assert set(image.text) == {"chara", "ccv3"}  # type: ignore[attr-defined]


def test_optional_fields_left_unset_are_absent_not_null() -> None:
    card = CharacterCardV2.model_validate({"data": {"name": "Bare"}})
    document = json.loads(card_json(card))
    assert "character_book" not in document["data"]
    assert document["data"]["extensions"] == {}
    assert spec_issues(document, "chara_card_v2") == []


def test_extensions_are_kept_whole_including_nulls_and_unknown_keys() -> None:
    card = full_card()
    back = read_png_card(write_png_card(card))
    assert back.data.extensions == {"talkativeness": "0.5", "fav": False, "world": None}
    entry = back.data.character_book.entries[0]  # type: ignore[union-attr]
    assert entry.extensions == {"depth": 4, "nested": {"a": [1, None, "x"]}}


def test_chunks_after_the_image_data_are_read_as_sillytavern_writes_them() -> None:
    card = full_card()
    png = tiny_png(after_image=(text_chunk("chara", card_text(card_document(card))),))
    assert read_png_card(png) == card


def test_the_keyword_is_matched_without_regard_to_case() -> None:
    card = full_card()
    png = tiny_png(before_image=(text_chunk("Chara", card_text(card_document(card))),))
    assert read_png_card(png) == card


def test_a_picture_given_is_the_portrait() -> None:
    picture = Image.new("RGB", (32, 48), (10, 200, 30))
    data = write_png_card(full_card(), picture)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (32, 48) and image.getpixel((0, 0)) == (10, 200, 30)


# V3 and V1 -----------------------------------------------------------------------------------


def test_ccv3_is_preferred_when_it_holds_a_valid_card() -> None:
    v2, v3 = full_card("Version Two"), to_v3(full_card("Version Three"))
    png = tiny_png(
        after_image=(
            text_chunk("chara", card_text(card_document(v2))),
            text_chunk("ccv3", card_text(json.loads(card_json(v3)))),
        )
    )
    assert read_png_card(png).data.name == "Version Three"


def test_an_invalid_ccv3_falls_back_to_chara() -> None:
    v2 = full_card("Version Two")
    bad_v3 = json.loads(card_json(to_v3(full_card())))
    del bad_v3["data"]["group_only_greetings"]
    png = tiny_png(
        after_image=(
            text_chunk("ccv3", card_text(bad_v3)),
            text_chunk("chara", card_text(card_document(v2))),
        )
    )
    assert read_png_card(png) == v2


def test_a_v3_only_png_names_the_v3_fault() -> None:
    bad_v3 = json.loads(card_json(to_v3(full_card())))
    del bad_v3["data"]["group_only_greetings"]
    with pytest.raises(CardError) as caught:
        read_png_card(tiny_png(after_image=(text_chunk("ccv3", card_text(bad_v3)),)))
    assert caught.value.chunk == "ccv3"
    assert fields_of(caught.value) == {"data.group_only_greetings": "is required"}


def test_v3_comes_down_to_v2_keeping_every_v2_field() -> None:
    card = full_card()
    document = json.loads(card_json(to_v3(card)))
    document["data"] |= {
        "nickname": "Ada",
        "creation_date": 1_700_000_000,
        "source": ["https://example.org/ada"],
        "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
    }
    document["data"]["character_book"]["entries"][0] |= {"use_regex": True, "id": "7"}
    document["data"]["character_book"]["entries"][1]["id"] = "not-a-number"
    back = read_document(document)
    assert back.data.character_book is not None
    assert back.data.character_book.entries[0].id == 7
    assert back.data.character_book.entries[1].id is None
    expected = card.model_copy(deep=True)
    assert expected.data.character_book is not None
    expected.data.character_book.entries[0].id = 7
    assert back == expected


def test_to_v3_and_back_is_the_identity() -> None:
    card = full_card()
    assert from_v3(to_v3(card)) == card
    assert CharacterCardV3.model_validate_json(card_json(to_v3(card))) == to_v3(card)


def test_a_v1_card_is_upgraded_with_v2_defaults() -> None:
    v1 = {
        "name": "Old Card",
        "description": "from TavernAI",
        "personality": "p",
        "scenario": "s",
        "first_mes": "hi",
        "mes_example": "",
        "avatar": "none",
        "chat": "Old Card - 2023-5-1",
    }
    card = read_document(v1)
    assert card.spec == "chara_card_v2"
    assert card.data.name == "Old Card" and card.data.first_mes == "hi"
    assert card.data.alternate_greetings == [] and card.data.extensions == {}


def test_a_v1_card_names_its_faults_at_the_root() -> None:
    with pytest.raises(CardError) as caught:
        read_document({"name": 5, "description": "x"})
    assert fields_of(caught.value) == {"name": "must be a string"}


# JSON documents that are not cards -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"name": "x"', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"name": NaN}', "NaN is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_bytes_that_are_not_json_are_bad_json(raw: bytes, expected: str) -> None:
    with pytest.raises(CardError) as caught:
        read_json_card(raw)
    assert caught.value.fault is Fault.BAD_JSON
    assert expected in caught.value.message


def test_a_json_value_that_is_not_an_object_is_invalid() -> None:
    with pytest.raises(CardError) as caught:
        read_json_card(b"[1, 2]")
    assert caught.value.fault is Fault.INVALID_CARD
    assert fields_of(caught.value) == {"": "must be an object"}


def test_an_unknown_spec_is_named() -> None:
    with pytest.raises(CardError) as caught:
        read_document({"spec": "chara_card_v9", "data": {}})
    assert list(fields_of(caught.value)) == ["spec"]


def test_a_missing_required_field_is_named_by_its_own_path() -> None:
    document = card_document(full_card())
    del document["data"]["creator"]
    del document["data"]["character_book"]["entries"][1]["insertion_order"]
    with pytest.raises(CardError) as caught:
        read_document(document)
    assert fields_of(caught.value) == {
        "data.character_book.entries.1.insertion_order": "is required",
        "data.creator": "is required",
    }


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda d: d.update(spec_version="2.1"), "spec_version", 'must be "2.0"'),
        (lambda d: d["data"].update(tags="a,b"), "data.tags", "must be an array"),
        (
            lambda d: d["data"]["character_book"]["entries"][0].update(position="top"),
            "data.character_book.entries.0.position",
            'must be one of "before_char", "after_char"',
        ),
        (
            lambda d: d["data"]["character_book"]["entries"][0].update(enabled="yes"),
            "data.character_book.entries.0.enabled",
            "must be true or false",
        ),
        (lambda d: d["data"].update(extensions=[]), "data.extensions", "must be an object"),
    ],
)
def test_a_departure_from_the_spec_schema_is_named(change: Any, field: str, message: str) -> None:
    document = card_document(full_card())
    change(document)
    with pytest.raises(CardError) as caught:
        read_document(document)
    assert caught.value.fault is Fault.INVALID_CARD
    assert fields_of(caught.value) == {field: message}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["data"].update(name=""), "data.name"),
        (lambda d: d["data"].update(name="n" * 257), "data.name"),
        (lambda d: d["data"].update(description="d" * 50_001), "data.description"),
        (lambda d: d["data"].update(alternate_greetings=["hi"] * 51), "data.alternate_greetings"),
        (lambda d: d["data"].update(tags=["t"] * 101), "data.tags"),
        (
            lambda d: d["data"]["character_book"]["entries"][0].update(keys=["k" * 257]),
            "data.character_book.entries.0.keys.0",
        ),
        (
            lambda d: d["data"]["character_book"]["entries"][0].update(insertion_order=1.5),
            "data.character_book.entries.0.insertion_order",
        ),
        (
            lambda d: d["data"]["character_book"].update(scan_depth=-1),
            "data.character_book.scan_depth",
        ),
    ],
)
def test_a_card_over_conveyors_bounds_is_named(change: Any, field: str) -> None:
    document = card_document(full_card())
    change(document)
    with pytest.raises(CardError) as caught:
        read_document(document)
    assert list(fields_of(caught.value)) == [field]


def test_a_lorebook_holds_at_most_the_bound_of_entries() -> None:
    document = card_document(full_card())
    entry = document["data"]["character_book"]["entries"][1]
    document["data"]["character_book"]["entries"] = [entry] * MAX_ENTRIES
    assert len(read_document(document).data.character_book.entries) == MAX_ENTRIES  # type: ignore[union-attr]
    document["data"]["character_book"]["entries"].append(entry)
    with pytest.raises(CardError) as caught:
        read_document(document)
    assert list(fields_of(caught.value)) == ["data.character_book.entries"]


def test_extensions_nested_too_deeply_are_refused_by_path() -> None:
    document = card_document(full_card())
    deep: Any = "leaf"
    for _ in range(MAX_NESTING + 1):
        deep = [deep]
    document["data"]["extensions"] = {"deep": deep}
    with pytest.raises(CardError) as caught:
        read_document(document)
    (field,) = fields_of(caught.value)
    assert field.startswith("data.extensions.deep.0")


def test_a_card_json_over_the_size_bound_is_too_large() -> None:
    with pytest.raises(CardError) as caught:
        read_json_card(b" " * (MAX_CARD_JSON_BYTES + 1))
    assert caught.value.fault is Fault.CARD_TOO_LARGE


# PNG files that hold no readable card ---------------------------------------------------------


def card_png() -> bytes:
    return write_png_card(full_card())


def fault_of(data: bytes) -> CardError:
    with pytest.raises(CardError) as caught:
        read_png_card(data)
    return caught.value


def test_a_file_that_is_not_a_png() -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    for data in (jpeg.getvalue(), b"", b"GIF89a", card_json(full_card())):
        assert fault_of(data).fault is Fault.NOT_PNG


def test_a_truncated_png_is_corrupt() -> None:
    data = card_png()
    for length in (10, 40, len(data) // 2, len(data) - 1):
        error = fault_of(data[:length])
        assert error.fault is Fault.CORRUPT_PNG and "cut short" in error.message


def test_a_flipped_byte_fails_the_crc_check() -> None:
    data = bytearray(card_png())
    data[len(data) // 2] ^= 0xFF
    error = fault_of(bytes(data))
    assert error.fault is Fault.CORRUPT_PNG and "CRC" in error.message


def test_a_png_whose_first_chunk_is_not_ihdr_is_corrupt() -> None:
    good = tiny_png()
    assert fault_of(good[:8] + good[33:]).fault is Fault.CORRUPT_PNG


def test_a_png_without_a_card_chunk() -> None:
    other = text_chunk("Comment", b"just a picture")
    for data in (tiny_png(), tiny_png(before_image=(other,))):
        error = fault_of(data)
        assert error.fault is Fault.NO_CARD and "chara" in error.message


def test_a_card_chunk_that_is_not_base64() -> None:
    error = fault_of(tiny_png(after_image=(text_chunk("chara", b"not*base64!"),)))
    assert error.fault is Fault.BAD_BASE64 and error.chunk == "chara"


def test_a_card_chunk_whose_base64_is_not_json() -> None:
    error = fault_of(tiny_png(after_image=(text_chunk("chara", base64.b64encode(b"{oops")),)))
    assert error.fault is Fault.BAD_JSON and error.chunk == "chara"


def test_a_card_chunk_with_an_invalid_card_names_the_field_and_the_chunk() -> None:
    document = card_document(full_card())
    document["data"]["character_book"]["entries"][0]["keys"] = "engine"
    error = fault_of(tiny_png(after_image=(text_chunk("chara", card_text(document)),)))
    assert error.fault is Fault.INVALID_CARD
    assert fields_of(error) == {"data.character_book.entries.0.keys": "must be an array"}
    assert "chara chunk" in str(error)


def test_a_text_chunk_without_a_keyword_is_corrupt() -> None:
    from tests.cardfiles import chunk

    error = fault_of(tiny_png(before_image=(chunk(b"tEXt", b"no separator"),)))
    assert error.fault is Fault.CORRUPT_PNG


# The schema files and the models agree ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "models"),
    [
        ("chara_card_v2", (CharacterCardV2Data, CharacterBook, CharacterBookEntry)),
        ("chara_card_v3", (CharacterCardV3Data, CharacterBookV3, CharacterBookEntryV3)),
    ],
)
def test_the_models_have_exactly_the_fields_of_the_spec_schema(
    spec: Any, models: tuple[type[BaseModel], ...]
) -> None:
    definitions = spec_schema(spec)["$defs"]
    book = "character_book" if spec == "chara_card_v2" else "lorebook"
    for name, model in zip(("data", book, "entry"), models, strict=True):
        assert set(definitions[name]["properties"]) == set(model.model_fields), name


# The placeholder portrait ------------------------------------------------------------------


def test_the_placeholder_is_the_same_for_the_same_name_and_differs_by_name() -> None:
    assert write_png_card(full_card("Ada")) == write_png_card(full_card("Ada"))
    assert background("Ada") != background("Grace")
    assert placeholder_avatar("Ada").getpixel((0, 0)) == background("Ada")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Ada Lovelace", "AL"), ("grace", "G"), ("Jean-Luc de la Barre", "JD"), ("!!", "?")],
)
def test_initials(name: str, expected: str) -> None:
    assert initials(name) == expected


# No file makes the reader fail otherwise than with a CardError ------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
card_field_names = st.sampled_from(
    [*CharacterCardV3Data.model_fields, "spec", "spec_version", "data", "entries", "keys"]
)
card_like = st.recursive(
    json_values,
    lambda children: st.dictionaries(card_field_names, children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(card_like)
def test_any_json_value_is_a_card_or_a_card_error(value: Any) -> None:
    raw = json.dumps(value).encode()
    for document in (raw, json.dumps({"spec": "chara_card_v2", "data": value}).encode()):
        with contextlib.suppress(CardError):
            read_json_card(document)


def damaged(data: st.DataObject, original: bytes) -> bytes:
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    return bytes(damaged[: data.draw(st.integers(0, len(damaged)))])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_damaged_card_png_is_a_card_or_a_card_error(data: st.DataObject) -> None:
    with contextlib.suppress(CardError):
        read_png_card(damaged(data, CARD_PNG))


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["text", "json"]))
def test_any_damaged_card_chunk_is_a_card_or_a_card_error(data: st.DataObject, layer: str) -> None:
    """Damage inside a chunk whose CRC is right: it reaches base64, JSON and validation."""
    document = card_json(full_card())
    text = damaged(data, card_text(json.loads(document))) if layer == "text" else None
    if text is None:
        text = base64.b64encode(damaged(data, document))
    with contextlib.suppress(CardError):
        read_png_card(tiny_png(after_image=(text_chunk("chara", text),)))


def test_the_schema_files_are_package_data() -> None:
    """An installed wheel has them: spec_schema reads them through importlib.resources."""
    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app.cards"]
    shipped = {path for pattern in patterns for path in (root / "app" / "cards").glob(pattern)}
    assert shipped == set((root / "app" / "cards" / "schemas").glob("*.json"))
    assert len(shipped) == 2
