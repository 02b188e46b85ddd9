"""The simulator's image endpoints over HTTP: OpenAI's Images API through the real `openai`
client, and ComfyUI's API through plain httpx and a real websocket client."""

from __future__ import annotations

import base64
import copy
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websocket
from PIL import Image

from app.sim.render import render_png
from devtools.simprocess import SimulatorProcess

TXT2IMG = Path(__file__).resolve().parents[2] / "app/kinds/workflows/txt2img.json"
# Generous: every wait below ends on an event; these only bound a broken run.
DEADLINE = 30.0
SOCKET_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(ttft=0.01, tps=1000, step_time=0.01) as process:
        yield process


@pytest.fixture(autouse=True)
def fresh_counters(sim: SimulatorProcess) -> None:
    sim.reset()


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def comfy(sim: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.comfy_url, timeout=10) as c:
        yield c


def unique(text: str) -> str:
    """A prompt of this test's own, so `times` counters never leak between tests."""
    return f"{text} ({uuid.uuid4().hex[:8]})"


def png_of(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def eventually(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- OpenAI: POST /v1/images/generations ---------------------------------------------------


def test_images_are_pngs_of_the_asked_size_with_usage(client: openai.OpenAI) -> None:
    prompt = unique("A lighthouse at dusk")
    result = client.images.generate(
        model="gpt-image-1",
        prompt=prompt,
        size="1536x1024",
        n=2,
        response_format="b64_json",
    )
    assert result.data is not None
    assert len(result.data) == 2
    pictures = [png_of(item.b64_json) for item in result.data]
    assert [picture.size for picture in pictures] == [(1536, 1024), (1536, 1024)]
    assert pictures[0].tobytes() != pictures[1].tobytes()  # each image of a batch differs
    assert result.data[0].revised_prompt is None  # GPT image models revise nothing
    assert result.size == "1536x1024"
    usage = result.usage
    assert usage is not None
    assert usage.input_tokens == len(prompt.split())
    assert usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_dall_e_3_revises_and_any_other_model_takes_any_size(client: openai.OpenAI) -> None:
    prompt = unique("A quiet harbor")
    dalle = client.images.generate(
        model="dall-e-3", prompt=prompt, size="1024x1792", response_format="b64_json"
    )
    assert dalle.data is not None
    assert png_of(dalle.data[0].b64_json).size == (1024, 1792)
    assert dalle.data[0].revised_prompt == prompt
    assert dalle.usage is None
    own = client.images.generate(
        model="sim-image", prompt=prompt, size="640x360", response_format="b64_json"
    )
    assert own.data is not None
    assert png_of(own.data[0].b64_json).size == (640, 360)


def test_same_prompt_same_png_other_prompt_other_png(client: openai.OpenAI) -> None:
    def picture(prompt: str) -> bytes:
        result = client.images.generate(
            model="sim-image", prompt=prompt, size="256x256", response_format="b64_json"
        )
        assert result.data is not None and result.data[0].b64_json is not None
        return base64.b64decode(result.data[0].b64_json)

    prompt = unique("A red bicycle")
    first = picture(prompt)
    assert picture(prompt) == first
    # Directives steer the request; they are not part of the picture.
    assert picture(f"{prompt} [[sim tag=picture-{uuid.uuid4().hex[:6]}]]") == first
    assert picture(unique("A blue bicycle")) != first


def test_rendering_is_repeatable_and_fast() -> None:
    first = render_png("a cat on the moon", 7, 1024, 1024)
    assert render_png("a cat on the moon", 7, 1024, 1024) == first
    assert render_png("a cat on the moon", 8, 1024, 1024) != first
    assert render_png("a cat on the moon", 7, 1024, 1024, index=1) != first
    fastest = min(_render_seconds() for _ in range(3))
    assert fastest < 0.25, f"a 1024x1024 picture took {fastest * 1000:.0f} ms"


def _render_seconds() -> float:
    started = time.perf_counter()
    render_png("timing", 1, 1024, 1024)
    return time.perf_counter() - started


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("dall-e-3", "512x512"),
        ("dall-e-2", "1792x1024"),
        ("gpt-image-1", "1000x1000"),
        ("sim-image", "100x100"),  # not a multiple of 8
        ("sim-image", "4096x4096"),  # above 2048
        ("sim-image", "huge"),
    ],
)
def test_sizes_a_model_does_not_make_are_refused(
    client: openai.OpenAI, model: str, size: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(
            model=model, prompt=unique("A tree"), size=size, response_format="b64_json"
        )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "size"
    assert size in error["message"]


def test_url_responses_and_too_many_images_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(model="dall-e-2", prompt=unique("A tree"), response_format="url")
    with pytest.raises(openai.BadRequestError, match="maximum value"):
        client.images.generate(
            model="dall-e-3", prompt=unique("A tree"), n=2, response_format="b64_json"
        )


def test_rate_limit_once_then_the_image(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    tag = f"img429-{uuid.uuid4().hex[:6]}"
    prompt = unique(f"A storm [[sim fault=429 times=1 retry_after=2 tag={tag}]]")
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="gpt-image-1", prompt=prompt, response_format="b64_json")
    assert caught.value.response.headers["Retry-After"] == "2"
    assert caught.value.code == "rate_limit_exceeded"
    result = client.images.generate(model="gpt-image-1", prompt=prompt, response_format="b64_json")
    assert result.data is not None
    assert png_of(result.data[0].b64_json).size == (1024, 1024)  # size "auto"
    logged = sim.requests(tag)
    assert [entry["outcome"] for entry in logged] == ["429", "ok"]
    assert logged[0]["endpoint"] == "/v1/images/generations"
    assert logged[0]["model"] == "gpt-image-1"
    assert logged[0]["prompt"].startswith("A storm")


def test_server_error_and_duration(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.images.generate(
            model="sim-image", prompt=unique("[[sim fault=500]] A"), response_format="b64_json"
        )
    started = time.monotonic()
    client.images.generate(
        model="sim-image", prompt=unique("[[sim duration=0.5]] A"), response_format="b64_json"
    )
    assert 0.5 <= time.monotonic() - started < 5


# --- ComfyUI: /prompt, /ws, /history, /view, /interrupt, /queue -----------------------------


def workflow(prompt: str, **values: Any) -> dict[str, Any]:
    """The shipped txt2img workflow with its named inputs set (prompt, width, count, ...)."""
    spec = json.loads(TXT2IMG.read_text())
    graph = copy.deepcopy(spec["workflow"])
    for name, value in {"prompt": prompt, "seed": 1, "steps": 6, **values}.items():
        node_id, field = spec["inputs"][name]
        graph[node_id]["inputs"][field] = value
    return graph


@contextmanager
def listening(sim: SimulatorProcess) -> Iterator[tuple[str, websocket.WebSocket]]:
    """A websocket as a ComfyUI client opens one, and its client id."""
    client_id = uuid.uuid4().hex
    url = f"ws://{sim.host}:{sim.port}/ws?clientId={client_id}"
    socket = websocket.create_connection(url, timeout=SOCKET_TIMEOUT)
    try:
        hello = json.loads(socket.recv())
        assert hello["type"] == "status"
        assert hello["data"]["sid"] == client_id
        yield client_id, socket
    finally:
        socket.close()


def submit(comfy: httpx.Client, graph: dict[str, Any], client_id: str) -> str:
    response = comfy.post("/prompt", json={"prompt": graph, "client_id": client_id})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["node_errors"] == {}
    assert isinstance(body["number"], int)
    return body["prompt_id"]


def receive_until(
    socket: websocket.WebSocket, prompt_id: str, last: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The prompt's messages (status messages left out) up to the first that `last` accepts."""
    deadline = time.monotonic() + DEADLINE
    received: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        message = json.loads(socket.recv())
        if message["data"].get("prompt_id") != prompt_id:
            continue
        received.append(message)
        if last(message):
            return received
    raise AssertionError(f"no final message in time; got {[m['type'] for m in received]}")


def is_end(message: dict[str, Any]) -> bool:
    return message["type"] == "executing" and message["data"]["node"] is None


def progress_at_least(value: int) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message["type"] == "progress" and message["data"]["value"] >= value


def history_of(comfy: httpx.Client, prompt_id: str) -> dict[str, Any]:
    history = comfy.get(f"/history/{prompt_id}").json()
    assert list(history) == [prompt_id]
    return history[prompt_id]


def test_a_workflow_runs_with_progress_and_its_images_can_be_fetched(
    sim: SimulatorProcess, comfy: httpx.Client
) -> None:
    graph = workflow(unique("A castle on a hill"), width=320, height=256, count=2, steps=6)
    with listening(sim) as (client_id, socket):
        prompt_id = submit(comfy, graph, client_id)
        messages = receive_until(socket, prompt_id, is_end)

    kinds = [message["type"] for message in messages]
    assert kinds[0] == "execution_start"
    assert kinds[-2:] == ["execution_success", "executing"]
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4, 5, 6]
    assert {(p["max"], p["node"]) for p in progress} == {(6, "3")}
    executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
    assert executing.index("3") < executing.index("9")
    (executed,) = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed["node"] == "9"
    images = executed["output"]["images"]
    assert len(images) == 2

    entry = history_of(comfy, prompt_id)
    assert entry["outputs"] == {"9": {"images": images}}
    status = entry["status"]
    assert status["status_str"] == "success"
    assert status["completed"] is True
    assert [name for name, _ in status["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["prompt"][1] == prompt_id
    pictures = []
    for image in images:
        assert image["type"] == "output"
        assert image["filename"].startswith("conveyor_") and image["filename"].endswith(".png")
        response = comfy.get("/view", params=image)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        assert (picture.format, picture.size) == ("PNG", (320, 256))
        pictures.append(response.content)
    assert pictures[0] != pictures[1]
    assert comfy.get("/view", params={"filename": "nothing_00001_.png"}).status_code == 404


def test_the_same_workflow_and_seed_give_the_same_png(
    sim: SimulatorProcess, comfy: httpx.Client
) -> None:
    prompt = unique("A windmill")

    def picture(seed: int) -> bytes:
        with listening(sim) as (client_id, socket):
            prompt_id = submit(comfy, workflow(prompt, seed=seed, steps=2), client_id)
            receive_until(socket, prompt_id, is_end)
        (image,) = history_of(comfy, prompt_id)["outputs"]["9"]["images"]
        return comfy.get("/view", params=image).content

    first = picture(seed=5)
    assert picture(seed=5) == first
    assert picture(seed=6) != first


def test_interrupt_mid_run(sim: SimulatorProcess, comfy: httpx.Client) -> None:
    tag = f"stop-{uuid.uuid4().hex[:6]}"
    # 400 steps of 50 ms: 20 s unless the interrupt ends it.
    graph = workflow(unique(f"A long one [[sim step_time=0.05 tag={tag}]]"), steps=400)
    started = time.monotonic()
    with listening(sim) as (client_id, socket):
        prompt_id = submit(comfy, graph, client_id)
        receive_until(socket, prompt_id, progress_at_least(2))
        assert comfy.post("/interrupt", json={"prompt_id": prompt_id}).status_code == 200
        messages = receive_until(socket, prompt_id, is_end)
    assert time.monotonic() - started < 15

    assert messages[-2]["type"] == "execution_interrupted"
    assert messages[-2]["data"]["node_id"] == "3"
    assert "execution_success" not in [message["type"] for message in messages]
    status = history_of(comfy, prompt_id)["status"]
    assert status["status_str"] == "error"
    assert status["completed"] is False
    assert status["messages"][-1][0] == "execution_interrupted"
    logged = [entry for entry in sim.requests(tag) if entry["endpoint"] == "/interrupt"]
    assert logged == [
        {"endpoint": "/interrupt", "tag": tag, "prompt_id": prompt_id, "outcome": "interrupted"}
    ]


def test_a_queued_prompt_can_be_deleted(sim: SimulatorProcess, comfy: httpx.Client) -> None:
    tag = f"queue-{uuid.uuid4().hex[:6]}"
    with listening(sim) as (client_id, socket):
        running_id = submit(
            comfy, workflow(unique("[[sim step_time=0.05]] Running"), steps=400), client_id
        )
        pending_id = submit(comfy, workflow(unique(f"[[sim tag={tag}]] Waiting")), client_id)
        receive_until(socket, running_id, progress_at_least(1))
        queue = comfy.get("/queue").json()
        assert [item[1] for item in queue["queue_running"]] == [running_id]
        assert [item[1] for item in queue["queue_pending"]] == [pending_id]

        assert comfy.post("/queue", json={"delete": [pending_id]}).status_code == 200
        assert comfy.get("/queue").json()["queue_pending"] == []
        comfy.post("/interrupt")
        receive_until(socket, running_id, is_end)
    # The next prompt runs at once; the deleted one never ran.
    with listening(sim) as (client_id, socket):
        receive_until(socket, submit(comfy, workflow(unique("After")), client_id), is_end)
    assert comfy.get(f"/history/{pending_id}").json() == {}
    (deleted,) = [entry for entry in sim.requests(tag) if entry["endpoint"] == "/queue"]
    assert deleted["removed"] == [pending_id]


def test_execution_error_fault(sim: SimulatorProcess, comfy: httpx.Client) -> None:
    graph = workflow(unique("[[sim fault=execution_error]] A"), steps=8)
    with listening(sim) as (client_id, socket):
        prompt_id = submit(comfy, graph, client_id)
        messages = receive_until(socket, prompt_id, is_end)
    progress = [m["data"]["value"] for m in messages if m["type"] == "progress"]
    assert progress == [1, 2, 3, 4]  # it fails once half the steps are done
    error = messages[-2]
    assert error["type"] == "execution_error"
    assert error["data"]["node_id"] == "3"
    assert error["data"]["exception_type"] == "torch.OutOfMemoryError"
    assert error["data"]["exception_message"]
    entry = history_of(comfy, prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert entry["outputs"] == {}


def test_a_hang_stalls_until_interrupted(sim: SimulatorProcess, comfy: httpx.Client) -> None:
    graph = workflow(unique("[[sim fault=hang]] A"), steps=4)
    with listening(sim) as (client_id, socket):
        prompt_id = submit(comfy, graph, client_id)
        receive_until(socket, prompt_id, progress_at_least(2))
        comfy.post("/interrupt")
        messages = receive_until(socket, prompt_id, is_end)
    # Without the hang, 4 steps of 10 ms would have ended in success long before.
    assert [m["type"] for m in messages] == ["execution_interrupted", "executing"]


def test_a_dropped_websocket_leaves_the_prompt_running(
    sim: SimulatorProcess, comfy: httpx.Client
) -> None:
    graph = workflow(unique("[[sim fault=drop]] A"), steps=6)
    with listening(sim) as (client_id, socket):
        prompt_id = submit(comfy, graph, client_id)
        with pytest.raises(websocket.WebSocketConnectionClosedException):
            receive_until(socket, prompt_id, is_end)
    eventually(lambda: comfy.get(f"/history/{prompt_id}").json() != {})
    assert history_of(comfy, prompt_id)["status"]["status_str"] == "success"


def test_prompt_http_faults_refuse_the_submission(comfy: httpx.Client) -> None:
    graph = workflow(unique("[[sim fault=429 times=1 retry_after=3]] A"), steps=1)
    refused = comfy.post("/prompt", json={"prompt": graph, "client_id": "x"})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "3"
    assert refused.json()["error"]["message"]
    assert comfy.post("/prompt", json={"prompt": graph, "client_id": "x"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        ({}, "no_prompt"),
        ({"prompt": "not a workflow"}, "invalid_prompt"),
        ({"prompt": {"1": {"inputs": {}}}}, "invalid_prompt"),
        ({"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}}, "prompt_no_outputs"),
        ({"prompt": workflow("[[sim fault=teapot]]")}, "invalid_prompt"),
        ({"prompt": workflow("A", width=100_000)}, "prompt_outputs_failed_validation"),
    ],
)
def test_bad_prompts_get_comfyuis_error_shape(
    comfy: httpx.Client, body: dict[str, Any], error_type: str
) -> None:
    response = comfy.post("/prompt", json=body)
    assert response.status_code == 400
    refusal = response.json()
    assert refusal["error"]["type"] == error_type
    assert refusal["error"]["message"]
    assert isinstance(refusal["node_errors"], dict)
    if error_type == "prompt_outputs_failed_validation":
        (problem,) = refusal["node_errors"]["5"]["errors"]
        assert problem["type"] == "value_bigger_than_max"
        assert problem["details"] == "width"
