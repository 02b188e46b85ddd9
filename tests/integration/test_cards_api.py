"""POST /api/v1/cards/import: a card written by app/cards comes back as the same card through
every way of sending it, and every bad file gets a problem that names what is wrong."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from flask import Flask

from app.cards import card_json, to_v3, write_png_card
from app.runtime import runtime
from tests.cardfiles import card_document, card_text, full_card, text_chunk, tiny_png
from tests.conftest import Tenant

URL = "/api/v1/cards/import"
PROBLEM = "application/problem+json"


def post_png(tenant: Tenant, data: bytes) -> Any:
    return tenant.post(URL, data=data, content_type="image/png")


def post_file(tenant: Tenant, data: bytes, filename: str = "card.png", field: str = "file") -> Any:
    return tenant.post(
        URL, data={field: (io.BytesIO(data), filename)}, content_type="multipart/form-data"
    )


def problem_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body: dict[str, Any] = response.get_json()
    assert body["status"] == status
    return body


def fields(problem: dict[str, Any]) -> dict[str, str]:
    return {error["field"]: error["message"] for error in problem["errors"]}


# The round trip -----------------------------------------------------------------------------


def test_a_png_written_by_app_cards_imports_as_the_same_card(tenant: Tenant) -> None:
    card = full_card()
    response = post_png(tenant, write_png_card(card))
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == card_document(card)


def test_a_multipart_png_upload_imports_as_the_same_card(tenant: Tenant) -> None:
    card = full_card("Grace Hopper")
    response = post_file(tenant, write_png_card(card))
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == card_document(card)


def test_a_json_card_imports_as_the_same_card(tenant: Tenant) -> None:
    card = full_card()
    response = tenant.post(URL, data=card_json(card), content_type="application/json")
    assert response.status_code == 200
    assert response.get_json() == card_document(card)


def test_a_json_card_file_upload_imports(tenant: Tenant) -> None:
    card = full_card()
    response = post_file(tenant, b"\n  " + card_json(card), filename="card.json")
    assert response.status_code == 200
    assert response.get_json() == card_document(card)


def test_a_v3_json_card_comes_back_as_v2(tenant: Tenant) -> None:
    card = full_card()
    response = tenant.post(URL, data=card_json(to_v3(card)), content_type="application/json")
    assert response.status_code == 200
    assert response.get_json() == card_document(card)


def test_a_v1_card_comes_back_upgraded(tenant: Tenant) -> None:
    response = tenant.post(URL, json={"name": "Old", "first_mes": "Hello."})
    assert response.status_code == 200
    body = response.get_json()
    assert body["spec"] == "chara_card_v2" and body["spec_version"] == "2.0"
    assert body["data"]["name"] == "Old" and body["data"]["first_mes"] == "Hello."
    assert body["data"]["description"] == "" and body["data"]["extensions"] == {}


def test_a_sillytavern_style_png_prefers_a_valid_ccv3(tenant: Tenant) -> None:
    v2, v3 = full_card("Two"), full_card("Three")
    png = tiny_png(
        after_image=(
            text_chunk("chara", card_text(card_document(v2))),
            text_chunk("ccv3", card_text(json.loads(card_json(to_v3(v3))))),
        )
    )
    response = post_png(tenant, png)
    assert response.status_code == 200
    assert response.get_json() == card_document(v3)


# Who may call it, and what it accepts ----------------------------------------------------------


def test_without_a_key_it_is_401(app: Flask) -> None:
    response = app.test_client().post(
        URL, data=write_png_card(full_card()), content_type="image/png"
    )
    problem_of(response, 401)


@pytest.mark.parametrize("content_type", ["image/jpeg", "text/plain", None])
def test_another_media_type_is_415(tenant: Tenant, content_type: str | None) -> None:
    kwargs = {"content_type": content_type} if content_type else {}
    problem = problem_of(tenant.post(URL, data=b"\xff\xd8\xff", **kwargs), 415)
    assert "image/png" in problem["detail"] and "application/json" in problem["detail"]


def test_a_body_over_the_card_limit_is_413(tenant: Tenant) -> None:
    limit = runtime().settings.card_max_bytes
    problem_of(post_png(tenant, write_png_card(full_card()) + b"\0" * limit), 413)
    problem_of(post_file(tenant, b"\0" * (limit + 1)), 413)


def test_a_png_larger_than_a_job_body_is_accepted(tenant: Tenant) -> None:
    """The card route has its own limit, above the API's general one."""
    card = full_card()
    padding = text_chunk("Comment", b"x" * (runtime().settings.max_request_bytes + 1))
    png = tiny_png(before_image=(padding, text_chunk("chara", card_text(card_document(card)))))
    response = post_png(tenant, png)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == card_document(card)


def test_a_multipart_upload_without_the_file_field_names_it(tenant: Tenant) -> None:
    response = post_file(tenant, write_png_card(full_card()), field="picture")
    assert fields(problem_of(response, 422)) == {"file": "a card file is required"}


def test_a_malformed_json_body_is_400(tenant: Tenant) -> None:
    response = tenant.post(URL, data=b'{"name": ', content_type="application/json")
    assert problem_of(response, 400)["type"] == "/problems/malformed-json"


# Files that hold no valid card: 422 naming the fault and the field ---------------------------


def test_a_file_that_is_not_a_png(tenant: Tenant) -> None:
    problem = problem_of(post_file(tenant, b"\xff\xd8\xff\xe0 a JPEG", "card.jpg"), 422)
    assert problem["type"] == "/problems/not-png"
    assert list(fields(problem)) == ["file"]
    raw = problem_of(post_png(tenant, b"GIF89a"), 422)
    assert raw["type"] == "/problems/not-png" and list(fields(raw)) == ["(body)"]


def test_a_truncated_png(tenant: Tenant) -> None:
    png = write_png_card(full_card())
    problem = problem_of(post_png(tenant, png[: len(png) // 2]), 422)
    assert problem["type"] == "/problems/corrupt-png"
    assert "cut short" in fields(problem)["(body)"]


def test_a_corrupt_png(tenant: Tenant) -> None:
    png = bytearray(write_png_card(full_card()))
    png[-20] ^= 0x55
    problem = problem_of(post_file(tenant, bytes(png)), 422)
    assert problem["type"] == "/problems/corrupt-png"
    assert "CRC" in fields(problem)["file"]


def test_a_png_without_a_card(tenant: Tenant) -> None:
    problem = problem_of(post_png(tenant, tiny_png()), 422)
    assert problem["type"] == "/problems/no-card"
    assert problem["title"] == "The PNG holds no character card"


def test_a_card_chunk_that_is_not_base64(tenant: Tenant) -> None:
    png = tiny_png(after_image=(text_chunk("chara", b"%%% not base64 %%%"),))
    problem = problem_of(post_png(tenant, png), 422)
    assert problem["type"] == "/problems/bad-base64"
    assert "chara chunk" in problem["detail"]


def test_a_card_chunk_that_is_not_json(tenant: Tenant) -> None:
    png = tiny_png(after_image=(text_chunk("chara", base64.b64encode(b"{'single': quotes}")),))
    problem = problem_of(post_png(tenant, png), 422)
    assert problem["type"] == "/problems/bad-json"
    assert "not valid JSON" in fields(problem)["(body)"]


def test_a_png_card_that_fails_validation_names_the_field(tenant: Tenant) -> None:
    document = card_document(full_card())
    document["data"]["character_book"]["entries"][1]["content"] = 42
    del document["data"]["name"]
    png = tiny_png(after_image=(text_chunk("chara", card_text(document)),))
    problem = problem_of(post_file(tenant, png), 422)
    assert problem["type"] == "/problems/invalid-card"
    assert fields(problem) == {
        "data.name": "is required",
        "data.character_book.entries.1.content": "must be a string",
    }
    assert "chara chunk" in problem["detail"]


def test_a_json_card_over_the_bounds_names_the_field(tenant: Tenant) -> None:
    document = card_document(full_card())
    entry = document["data"]["character_book"]["entries"][0]
    document["data"]["character_book"]["entries"] = [entry] * 51
    problem = problem_of(tenant.post(URL, json=document), 422)
    assert problem["type"] == "/problems/invalid-card"
    assert list(fields(problem)) == ["data.character_book.entries"]
    assert "at most 50" in fields(problem)["data.character_book.entries"]


def test_a_json_value_that_is_not_a_card_object(tenant: Tenant) -> None:
    problem = problem_of(tenant.post(URL, json=["not", "a", "card"]), 422)
    assert fields(problem) == {"(body)": "must be an object"}


def test_the_operation_is_in_the_openapi_document(app: Flask) -> None:
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    operation = document["paths"][URL]["post"]
    assert set(operation["requestBody"]["content"]) == {
        "application/json",
        "image/png",
        "multipart/form-data",
    }
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CharacterCardV2"
    }
    assert {"401", "413", "415", "422"} <= set(operation["responses"])


def test_the_reference_page_lists_each_body_type(app: Flask) -> None:
    page = app.test_client().get("/api/v1/docs").get_data(as_text=True)
    operation = page[page.index("/api/v1/cards/import") :]
    body = operation[operation.index("Body:") : operation.index("</p>", operation.index("Body:"))]
    assert "image/png" in body and "multipart/form-data" in body and "CharacterCardV2" in body
