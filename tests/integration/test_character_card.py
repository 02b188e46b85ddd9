"""The `character_card` kind through the whole stack (API, PostgreSQL, Redis, the in-process
Celery worker, the simulator over HTTP), its downloads, and a downloaded card read back by
the import endpoint and by SillyTavern's own chunk packages (Node)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app.cards import card_from_value, read_png_card
from app.cards.schema import spec_issues
from app.keys.api_keys import create_api_key
from app.runtime import runtime
from devtools.simprocess import SimulatorProcess
from tests.conftest import Tenant
from tests.integration.test_cards_node_reader import read_with_node

pytestmark = pytest.mark.usefixtures("worker")

# Each step's system message starts so (app/kinds/character_card.py).
SYSTEM_OF_STEP = {
    "profile": "You write characters",
    "greetings": "You write the opening",
    "lorebook": "You build lorebooks",
    "review": "You check roleplay",
}


def _tag() -> str:
    return f"c{uuid.uuid4().hex[:12]}"


def _card_job(tenant: Tenant, tag: str, directives: str = "", **fields: Any) -> str:
    job_input = {
        "concept": f"A lighthouse keeper who collects storms [[sim tag={tag}]] {directives}",
        "name": "Mira Holloway",
        "genre": "gothic",
        "tags": ["sea", "mystery"],
        "creator": "conveyor-tests",
        "lorebook_entries": 3,
        "alternate_greetings": 2,
        **fields,
    }
    return tenant.submit("character_card", job_input)["id"]


def _requests_by_step(sim: SimulatorProcess, tag: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {step: [] for step in SYSTEM_OF_STEP}
    for request in sim.requests(tag):
        step = next(
            s for s, system in SYSTEM_OF_STEP.items() if request["system"].startswith(system)
        )
        found[step].append(request["outcome"])
    return found


@pytest.fixture(scope="module")
def card_job(app: Flask, worker: object, simulator: SimulatorProcess) -> dict[str, Any]:
    """One card, made once for the tests that only read it, by a tenant of its own."""
    with app.app_context():
        owner = f"tenant-{uuid.uuid4().hex[:10]}"
        tenant = Tenant(owner, create_api_key(runtime().db, owner), app.test_client())
    tag = _tag()
    job = tenant.wait_for(_card_job(tenant, tag), timeout=120)
    assert job["status"] == "succeeded", job
    return {"job": job, "tag": tag, "tenant": tenant}


def test_a_card_job_writes_a_valid_v2_card_in_four_steps(
    simulator: SimulatorProcess, card_job: dict[str, Any]
) -> None:
    job, tenant = card_job["job"], card_job["tenant"]
    output = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]
    assert spec_issues(output, "chara_card_v2") == []
    card = card_from_value(output)
    data = card.data
    assert data.name == "Mira Holloway"  # the request's name wins over the model's
    assert data.tags == ["sea", "mystery"] and data.creator == "conveyor-tests"
    assert len(data.alternate_greetings) == 2
    assert data.character_book is not None and len(data.character_book.entries) == 3
    assert all(entry.keys and entry.content for entry in data.character_book.entries)
    assert data.first_mes and data.description and data.mes_example

    assert _requests_by_step(simulator, card_job["tag"]) == {
        step: ["ok"] for step in SYSTEM_OF_STEP
    }
    calls = tenant.get(f"/api/v1/jobs/{job['id']}/calls").get_json()["items"]
    assert [(c["step"], c["role"]) for c in calls] == [
        ("profile", "creative"),
        ("greetings", "creative"),
        ("lorebook", "analysis"),
        ("review", "analysis"),
    ]
    events = tenant.get(f"/api/v1/jobs/{job['id']}/events?limit=1000").get_json()["items"]
    finished = [e["data"]["step"] for e in events if e["type"] == "job.step"]
    assert finished == [s for step in SYSTEM_OF_STEP for s in (step, step)]


def test_the_card_downloads_as_json_v2_and_png_named_after_the_character(
    card_job: dict[str, Any], tmp_path: Path
) -> None:
    job_id, tenant = card_job["job"]["id"], card_job["tenant"]
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]

    as_json = tenant.get(f"/api/v1/jobs/{job_id}/download/json")
    assert as_json.status_code == 200 and as_json.mimetype == "application/json"
    assert as_json.get_json() == output
    assert 'filename="Mira Holloway.json"' in as_json.headers["Content-Disposition"]

    v2 = tenant.get(f"/api/v1/jobs/{job_id}/download/card_v2")
    assert v2.status_code == 200
    assert card_from_value(v2.get_json()) == card_from_value(output)
    assert 'filename="Mira Holloway.card.json"' in v2.headers["Content-Disposition"]

    png = tenant.get(f"/api/v1/jobs/{job_id}/download/png")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert 'filename="Mira Holloway.png"' in png.headers["Content-Disposition"]
    assert read_png_card(png.data) == card_from_value(output)
    path = tmp_path / "card.png"
    path.write_bytes(png.data)
    assert read_with_node(path)["chara"] == card_from_value(output).model_dump(mode="json")

    imported = tenant.client.post(
        "/api/v1/cards/import",
        data=png.data,
        headers={"Authorization": f"Bearer {tenant.key}", "Content-Type": "image/png"},
    )
    assert imported.status_code == 200, imported.get_json()
    assert card_from_value(imported.get_json()) == card_from_value(output)


def test_a_model_error_in_the_lorebook_resumes_there_without_paying_again(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    tag = _tag()
    job_id = _card_job(tenant, tag, "[[sim step=lorebook fault=500 times=1]]")
    job = tenant.wait_for(job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert _requests_by_step(simulator, tag) == {
        "profile": ["ok"],
        "greetings": ["ok"],
        "lorebook": ["500", "ok"],
        "review": ["ok"],
    }


def test_no_lorebook_entries_asked_is_no_lorebook_call_and_no_book(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    tag = _tag()
    job = tenant.wait_for(_card_job(tenant, tag, lorebook_entries=0), timeout=120)
    assert job["status"] == "succeeded", job
    output = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]
    assert "character_book" not in output["data"]
    assert _requests_by_step(simulator, tag)["lorebook"] == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"lorebook_entries": 51}, "input.lorebook_entries"),
        ({"alternate_greetings": -1}, "input.alternate_greetings"),
        ({"point_of_view": "fourth"}, "input.point_of_view"),
        ({"concept": ""}, "input.concept"),
        ({"tags": ["x"] * 21}, "input.tags"),
    ],
)
def test_bad_card_input_is_a_422_naming_the_field(
    tenant: Tenant, fields: dict[str, Any], field: str
) -> None:
    body = {"concept": "a baker", **fields}
    response = tenant.post("/api/v1/jobs", json={"kind": "character_card", "input": body})
    assert response.status_code == 422, response.get_json()
    assert field in [error["field"] for error in response.get_json()["errors"]]


def test_downloads_refuse_what_does_not_exist_yet_or_here(
    new_tenant: Any, card_job: dict[str, Any]
) -> None:
    job_id, tenant = card_job["job"]["id"], card_job["tenant"]
    unknown = tenant.get(f"/api/v1/jobs/{job_id}/download/docx")
    assert unknown.status_code == 404
    assert unknown.headers["Content-Type"] == "application/problem+json"

    chat = tenant.submit("chat", {"prompt": "slow [[sim ttft=30]]"})["id"]
    running = tenant.get(f"/api/v1/jobs/{chat}/download/json")
    assert running.status_code == 409
    assert tenant.get(f"/api/v1/jobs/{chat}/download/png").status_code == 404  # not a card
    tenant.post(f"/api/v1/jobs/{chat}/cancel")

    other = new_tenant()
    for fmt in ("json", "card_v2", "png"):
        assert other.get(f"/api/v1/jobs/{job_id}/download/{fmt}").status_code == 404
