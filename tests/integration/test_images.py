"""The `image` kind through both simulated providers (OpenAI's Images API and ComfyUI's HTTP
API), run by the real Celery worker; images read back as artifacts and decoded."""

from __future__ import annotations

import io
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from PIL import Image

from app.cards import read_png_card
from app.runtime import runtime
from tests.conftest import Tenant, wait_until

pytestmark = pytest.mark.usefixtures("worker")


def _images(tenant: Tenant, job_id: str) -> list[Image.Image]:
    listed = tenant.get(f"/api/v1/jobs/{job_id}/artifacts").get_json()["items"]
    pictures = []
    for item in listed:
        data = tenant.get(f"/api/v1/artifacts/{item['id']}").data
        picture = Image.open(io.BytesIO(data))
        picture.load()
        assert (picture.width, picture.height) == (item["width"], item["height"])
        pictures.append(picture)
    return pictures


def _sim_calls(endpoint: str, tag: str) -> list[dict[str, Any]]:
    """The simulator's log of calls to a ComfyUI endpoint about the prompt tagged `tag`."""
    base = runtime().settings.comfyui_url
    items = httpx.get(f"{base}/_sim/requests", params={"tag": tag}, timeout=5).json()["items"]
    return [item for item in items if item.get("endpoint") == endpoint]


def test_openai_images_are_stored_and_priced(tenant: Tenant) -> None:
    job = tenant.submit("image", {"prompt": "a lighthouse at dusk", "count": 2})
    done = tenant.wait_for(job["id"], timeout=30)
    assert done["status"] == "succeeded", done
    output = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]
    assert output["provider"] == "openai" and output["model"] == "gpt-image-1"
    pictures = _images(tenant, job["id"])
    assert len(pictures) == 2
    assert all((p.format, p.size) == ("PNG", (1024, 1024)) for p in pictures)
    # gpt-image-1 at 1024x1024: $0.042 an image.
    assert Decimal(done["usage"]["cost_usd"]) == Decimal("0.084")


@pytest.mark.parametrize(
    ("job_input", "field"),
    [
        ({"prompt": "x", "width": 1020}, "input.width"),
        ({"prompt": "x", "height": 4096}, "input.height"),
        ({"prompt": "x", "count": 5}, "input.count"),
        ({"prompt": ""}, "input.prompt"),
        ({"prompt": "x", "negative_prompt": "blurry"}, "input.negative_prompt"),
        ({"prompt": "x", "seed": 3}, "input.seed"),
        ({"prompt": "x", "width": 512, "height": 512}, "input.width"),
        ({"prompt": "x", "workflow": "no-such-flow"}, "input.workflow"),
        ({"prompt": "x", "workflow": "../etc"}, "input.workflow"),
        ({"prompt": "x", "workflow": "txt2img", "provider": "openai"}, "input"),
    ],
)
def test_bad_image_input_is_a_422_naming_the_field(
    tenant: Tenant, job_input: dict[str, Any], field: str
) -> None:
    response = tenant.post("/api/v1/jobs", json={"kind": "image", "input": job_input})
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert problem["errors"][0]["field"] == field, problem


def test_comfyui_images_follow_the_workflow_and_report_progress(tenant: Tenant) -> None:
    job_input = {
        "prompt": "an anime fox in the snow",
        "negative_prompt": "blurry",
        "workflow": "txt2img",
        "width": 512,
        "height": 384,
        "steps": 12,
        "seed": 42,
        "count": 2,
    }
    job = tenant.submit("image", job_input)
    done = tenant.wait_for(job["id"], timeout=30)
    assert done["status"] == "succeeded", done
    output = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]
    assert (output["provider"], output["workflow"], output["seed"]) == ("comfyui", "txt2img", 42)
    assert output["gpu_seconds"] > 0
    pictures = _images(tenant, job["id"])
    assert [p.size for p in pictures] == [(512, 384), (512, 384)]
    events = tenant.get(f"/api/v1/jobs/{job['id']}/events").get_json()["items"]
    progress = [e["data"]["progress"] for e in events if e["type"] == "job.progress"]
    assert progress, "ComfyUI's progress messages became no job progress"
    assert progress == sorted(progress) and 0 < progress[-1] <= 100
    rate = Decimal(str(runtime().settings.comfyui_usd_per_gpu_second))
    cost = Decimal(done["usage"]["cost_usd"])
    assert cost == (rate * Decimal(str(output["gpu_seconds"]))).quantize(Decimal("1e-8"))

    again = tenant.wait_for(tenant.submit("image", job_input)["id"], timeout=30)
    assert _digests(tenant, job["id"]) == _digests(tenant, again["id"]), (
        "the same prompt and seed must render the same images"
    )


def _digests(tenant: Tenant, job_id: str) -> list[str]:
    items = tenant.get(f"/api/v1/jobs/{job_id}/artifacts").get_json()["items"]
    return [item["sha256"] for item in items]


def test_cancel_mid_generation_reaches_comfyui_and_leaves_no_image(tenant: Tenant) -> None:
    tag = f"cancel-{uuid.uuid4().hex[:8]}"
    job = tenant.submit(
        "image",
        {
            "prompt": f"slow one [[sim step_time=0.2 tag={tag}]]",
            "workflow": "txt2img",
            "steps": 100,
        },
    )
    wait_until(
        lambda: any(
            e["type"] == "job.progress"
            for e in tenant.get(f"/api/v1/jobs/{job['id']}/events").get_json()["items"]
        ),
        timeout=20,
    )
    assert tenant.post(f"/api/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    done = tenant.wait_for(job["id"], timeout=20)
    assert done["status"] == "canceled"
    wait_until(lambda: _sim_calls("/interrupt", tag), timeout=10)
    assert tenant.get(f"/api/v1/jobs/{job['id']}/artifacts").get_json()["items"] == []


def test_delete_of_a_running_job_names_the_cancel_url(tenant: Tenant) -> None:
    job = tenant.submit(
        "image", {"prompt": "slow [[sim step_time=0.2]]", "workflow": "txt2img", "steps": 100}
    )
    tenant.wait_for(job["id"], "running", timeout=20)
    response = tenant.delete(f"/api/v1/jobs/{job['id']}")
    assert response.status_code == 409
    problem = response.get_json()
    assert problem["cancel"] == f"/api/v1/jobs/{job['id']}/cancel"
    assert problem["cancel"] in problem["detail"]
    tenant.post(problem["cancel"])
    assert tenant.wait_for(job["id"], timeout=20)["status"] == "canceled"


def test_a_card_png_uses_an_image_jobs_output_as_its_avatar(tenant: Tenant) -> None:
    portrait = tenant.submit(
        "image",
        {"prompt": "portrait of a knight", "workflow": "txt2img", "width": 400, "height": 600},
    )
    assert tenant.wait_for(portrait["id"], timeout=30)["status"] == "succeeded"
    card_job = tenant.submit(
        "character_card",
        {"concept": "a knight", "lorebook_entries": 0, "avatar_job_id": portrait["id"]},
    )
    assert tenant.wait_for(card_job["id"], timeout=60)["status"] == "succeeded"
    png = tenant.get(f"/api/v1/jobs/{card_job['id']}/download/png")
    assert png.status_code == 200
    picture = Image.open(io.BytesIO(png.data))
    [source] = _images(tenant, portrait["id"])
    assert picture.size == source.size == (400, 600)
    assert picture.convert("RGB").tobytes() == source.convert("RGB").tobytes()
    assert read_png_card(png.data).data.name

    chat = tenant.submit("chat", {"prompt": "hi"})
    tenant.wait_for(chat["id"])
    wrong = tenant.get(f"/api/v1/jobs/{card_job['id']}/download/png?avatar_job={chat['id']}")
    assert wrong.status_code == 422
    assert wrong.get_json()["errors"][0]["field"] == "avatar_job"
