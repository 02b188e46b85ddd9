"""The dashboard in a real headless Chromium (driven by Playwright), against the real
web process, worker, PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Route,
    WebSocketRoute,
    expect,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

from app.config import Settings
from app.jobs import budgets
from app.runtime import runtime
from tests.conftest import Tenant
from tests.webserver import WebServer

JOB_PAGE = re.compile(r"#/jobs/([0-9a-f-]{36})$")
# As the machine's own probe starts it: no sandbox as root, and no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.usefixtures("worker")

# Records every state the connection indicator passes through, in window.connectionStates.
RECORD_CONNECTION_STATES = """
window.connectionStates = [];
new MutationObserver(() => window.connectionStates.push(
  document.getElementById("connection").dataset.state
)).observe(document.getElementById("connection"), { attributes: true });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Debian's chromium where it is installed, else the one Playwright downloaded; `make test`
    # provides one of the two first (tools/require).
    executable = shutil.which("chromium")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            pytest.fail(f"no Chromium to drive; run tools/require chromium ({exc})")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def dashboard_server(settings: Settings, app) -> Iterator[WebServer]:
    """Its own web process: one test restarts it."""
    server = WebServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
def context(browser: Browser, dashboard_server: WebServer) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=dashboard_server.url)
    yield context
    context.close()


def sign_in(page: Page, tenant: Tenant, connection: str = "live") -> Page:
    page.goto("/")
    page.fill("#api-key", tenant.key)
    page.click("#sign-in-form button")
    expect(page.locator("#home")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", connection, timeout=10_000)
    return page


@pytest.fixture
def page(context: BrowserContext, tenant: Tenant) -> Page:
    return sign_in(context.new_page(), tenant)


def without_socketio(page: Page) -> None:
    """As behind a proxy that refuses WebSockets: the page has no Socket.IO at all."""
    page.route("**/vendor/socket.io.min.js", lambda route: route.abort())


def submit_chat(page: Page, prompt: str) -> str:
    page.select_option("#kind", "chat")
    page.fill("#kind-fields textarea[name=prompt]", prompt)
    page.click("#new-job button[type=submit]")
    page.wait_for_url(JOB_PAGE)
    job_id = JOB_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    expect(page.locator("#job-id")).to_have_text(job_id)
    return job_id


def stored_text(tenant: Tenant, job_id: str) -> str:
    return tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]["text"]


def job_ids(tenant: Tenant) -> list[str]:
    return [job["id"] for job in tenant.get("/api/v1/jobs").get_json()["items"]]


def row(page: Page, job_id: str):
    return page.locator(f"tr[data-job-id='{job_id}']")


def alert_saying(page: Page, text: str):
    return page.locator("[role=alert]:visible", has_text=text)


def test_submit_a_chat_job_and_watch_it_stream_to_the_end(page: Page, tenant: Tenant) -> None:
    job_id = submit_chat(page, "[[sim tokens=60 tps=30]] Tell me about conveyors.")
    # The text arrives while the job runs, not only at the end.
    expect(page.locator("#job-status")).to_have_text("running", timeout=10_000)
    expect(page.locator("#job-output")).not_to_be_empty(timeout=10_000)
    expect(page.locator("#job-progress-text")).to_have_text("100%", timeout=20_000)
    expect(page.locator("#job-status")).to_have_text("succeeded")
    assert page.locator("#job-output").inner_text() == stored_text(tenant, job_id)
    assert page.locator("#job-progress").get_attribute("value") == "100"
    # Tokens and cost are shown; the timeline has the lifecycle.
    expect(page.locator("#job-tokens")).to_contain_text(" out")
    expect(page.locator("#job-timeline")).to_contain_text("job.succeeded")
    # The list shows it too.
    page.click("text=← All jobs")
    expect(page.locator(f"tr[data-job-id='{job_id}'] .status")).to_have_text("succeeded")


def test_the_page_reconnects_after_a_web_restart_and_ends_with_the_whole_text(
    page: Page, tenant: Tenant, dashboard_server: WebServer
) -> None:
    job_id = submit_chat(page, "[[sim tokens=300 tps=40]] A long story, please.")
    expect(page.locator("#job-output")).not_to_be_empty(timeout=10_000)
    page.evaluate(RECORD_CONNECTION_STATES)

    dashboard_server.restart()  # the job streams on while the web process is away

    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=20_000)
    assert "reconnecting" in page.evaluate("window.connectionStates")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)
    assert page.locator("#job-output").inner_text() == stored_text(tenant, job_id)


def test_without_websockets_the_page_polls_the_api_to_the_end(
    context: BrowserContext, tenant: Tenant
) -> None:
    page = context.new_page()
    without_socketio(page)
    sign_in(page, tenant, connection="polling")
    job_id = submit_chat(page, "[[sim tokens=60 tps=30]] Over plain HTTP.")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=20_000)
    expect(page.locator("#job-progress-text")).to_have_text("100%")
    assert page.locator("#job-output").inner_text() == stored_text(tenant, job_id)


def test_without_websockets_the_job_list_polls_the_api(
    context: BrowserContext, tenant: Tenant
) -> None:
    page = context.new_page()
    without_socketio(page)
    sign_in(page, tenant, connection="polling")
    expect(page.locator("#job-rows tr")).to_have_count(0)
    # Submitted elsewhere (another tab, a backend): the list finds it and follows it to the end.
    job_id = tenant.submit("chat", {"prompt": "[[sim tokens=40 tps=20]] elsewhere"})["id"]
    expect(row(page, job_id)).to_be_visible(timeout=30_000)
    expect(row(page, job_id).locator(".status")).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("#connection")).to_have_attribute("data-state", "polling")


def withhold_progress_events(ws: WebSocketRoute) -> None:
    """Relays the Socket.IO connection but drops the `job.progress` events, which a worker
    writes only every few seconds in production: what moves a bar then can only be a delta."""
    server = ws.connect_to_server()
    progress_event = re.compile(r'"type":\s*"job\.progress"')
    server.on_message(
        lambda message: (
            None
            if isinstance(message, str) and progress_event.search(message)
            else ws.send(message)
        )
    )


def test_the_list_shows_a_running_jobs_progress_from_its_deltas(
    context: BrowserContext, tenant: Tenant
) -> None:
    page = context.new_page()
    page.route_web_socket(re.compile(r"/socket\.io/"), withhold_progress_events)
    sign_in(page, tenant)
    job_id = tenant.submit("chat", {"prompt": "[[sim tokens=100 tps=10]] a running row"})["id"]
    expect(row(page, job_id)).to_be_visible(timeout=10_000)
    page.wait_for_function(
        """(jobId) => {
            const row = document.querySelector(`tr[data-job-id="${jobId}"]`);
            const running = row?.cells[2].textContent === "running";
            return running && row.querySelector("progress").value > 0;
        }""",
        arg=job_id,
        # The answer streams for 10 s: on a loaded machine a 5 s one once ended before the
        # list had shown it running with progress (a full `make test`; not reproduced alone).
        timeout=20_000,
    )
    expect(row(page, job_id).locator(".status")).to_have_text("succeeded", timeout=30_000)
    expect(row(page, job_id).locator("progress")).to_have_attribute("value", "100")


def test_a_double_click_on_submit_creates_one_job(page: Page, tenant: Tenant) -> None:
    keys: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            keys.append(request.headers.get("idempotency-key"))
            if request.method == "POST" and request.url.endswith("/api/v1/jobs")
            else None
        ),
    )
    page.select_option("#kind", "chat")
    page.fill("#kind-fields textarea[name=prompt]", "[[sim tokens=20]] once, please")
    page.dblclick("#new-job button[type=submit]")
    page.wait_for_url(JOB_PAGE)
    job_id = JOB_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    # By the time it has run to the end, a second POST would long have landed.
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=20_000)
    assert job_ids(tenant) == [job_id]
    # Another submission of the same form is another job, with a key of its own.
    page.click("text=← All jobs")
    second = submit_chat(page, "[[sim tokens=20]] once, please")
    assert sorted(job_ids(tenant)) == sorted([job_id, second])
    assert len(keys) == 2 and all(keys) and keys[0] != keys[1], keys


def test_a_submission_whose_answer_is_lost_is_retried_with_its_key(
    page: Page, tenant: Tenant
) -> None:
    keys: list[str | None] = []
    replayed: list[str | None] = []

    def lose_the_first_answer(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) == 1:
            route.fetch()  # the server creates the job...
            route.abort("connectionreset")  # ...and its answer never reaches the page
        else:
            response = route.fetch()
            replayed.append(response.headers.get("idempotent-replayed"))
            route.fulfill(response=response)

    page.route("**/api/v1/jobs", lose_the_first_answer)
    job_id = submit_chat(page, "[[sim tokens=20]] lost on the way back")
    assert job_ids(tenant) == [job_id]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1], keys
    assert replayed == ["true"]


def unreachable(route: Route) -> None:
    route.abort("connectionrefused")


def test_a_failure_after_an_action_is_shown_not_swallowed(page: Page, tenant: Tenant) -> None:
    job_id = submit_chat(page, "[[sim tokens=400 tps=40]] cancel me")
    expect(page.locator("#job-status")).to_have_text("running", timeout=10_000)
    # Cancel is accepted, but reading the job back afterwards fails: the page must say so
    # rather than go on showing "running" as if all were well.
    job_url = re.compile(rf"/api/v1/jobs/{job_id}$")
    page.route(job_url, unreachable)
    page.click("#cancel-job")
    expect(alert_saying(page, "Failed to fetch")).to_be_visible(timeout=15_000)
    assert tenant.wait_for(job_id)["status"] == "canceled"
    page.unroute(job_url)
    page.reload()
    expect(page.locator("#job-status")).to_have_text("canceled", timeout=10_000)
    expect(alert_saying(page, "Failed to fetch")).to_have_count(0)
    # Delete succeeds, but the list it returns to cannot be loaded.
    page.route(re.compile(r"/api/v1/jobs\?"), unreachable)
    page.click("#delete-job")
    expect(page.locator("#home")).to_be_visible()
    expect(alert_saying(page, "Failed to fetch")).to_be_visible(timeout=10_000)
    assert job_ids(tenant) == []


def test_an_old_job_whose_stream_expired_shows_its_stored_output(
    page: Page, tenant: Tenant
) -> None:
    from app.jobs.events import stream_key
    from app.runtime import runtime

    job_id = tenant.submit("chat", {"prompt": "from long ago"})["id"]
    tenant.wait_for(job_id)
    runtime().redis.delete(stream_key(job_id))  # replayed from PostgreSQL: no deltas, holes
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#job-timeline")).to_contain_text("job.succeeded")
    expect(page.locator("#job-output")).to_have_text(stored_text(tenant, job_id))


def test_a_form_error_is_shown_next_to_its_field(page: Page) -> None:
    page.select_option("#kind", "structured")
    page.fill("#kind-fields textarea[name=prompt]", "a cat")
    page.fill("#kind-fields textarea[name=schema]", "{not json")
    page.click("#new-job button[type=submit]")
    schema_error = page.locator(".field-error[data-field='input.schema']")
    expect(schema_error).to_contain_text("not valid JSON")
    page.fill("#kind-fields textarea[name=schema]", '{"type": "string"}')
    page.click("#new-job button[type=submit]")
    # Now the server's 422 (the root must be an object), placed on its field.
    expect(schema_error).to_contain_text("object")
    expect(page.locator("#home")).to_be_visible()


CARD_STEPS = ["profile", "greetings", "lorebook", "review"]
USD = re.compile(r"^\$\d+\.\d{8}$")


def test_a_card_job_from_the_form_shows_its_card_steps_costs_and_png(
    page: Page, tenant: Tenant
) -> None:
    from app.cards import read_png_card

    page.select_option("#kind", "character_card")
    page.fill("#kind-fields textarea[name=concept]", "A lighthouse keeper who collects storms")
    page.fill("#kind-fields input[name=lorebook_entries]", "2")
    page.fill("#kind-fields input[name=alternate_greetings]", "2")
    page.click("#new-job button[type=submit]")
    page.wait_for_url(JOB_PAGE)
    job_id = JOB_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    expect(page.locator("#card-view")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=45_000)

    steps = page.locator("#card-steps tr")
    expect(steps).to_have_count(4)
    assert [steps.nth(i).get_attribute("data-step") for i in range(4)] == CARD_STEPS
    for i in range(4):
        expect(steps.nth(i).locator("td").nth(1)).to_have_text("finished")
        expect(steps.nth(i).locator("td").nth(3)).to_have_text(USD)

    card = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]["data"]
    expect(page.locator("#card-result")).to_be_visible()
    expect(page.locator("#card-name")).to_have_text(card["name"])
    expect(page.locator("#card-description")).to_have_text(card["description"])
    expect(page.locator("#card-first-mes")).to_have_text(card["first_mes"])
    expect(page.locator("#card-greetings li")).to_have_count(2)
    expect(page.locator("#card-lorebook li")).to_have_count(2)
    first_entry = card["character_book"]["entries"][0]
    expect(page.locator("#card-lorebook li").first.locator(".content")).to_have_text(
        first_entry["content"]
    )

    with page.expect_download() as download_info:
        page.click("#card-downloads button[data-format=png]")
    download = download_info.value
    assert download.suggested_filename.endswith(".png")
    with open(download.path(), "rb") as downloaded:
        png_card = read_png_card(downloaded.read())
    assert png_card.data.name == card["name"]
    assert len(png_card.data.alternate_greetings) == 2


def test_the_card_view_never_renders_model_text_as_html(page: Page, tenant: Tenant) -> None:
    # The card's name is the caller's when given, and every step's text is model output: both
    # must reach the page as text.
    name = "<img src=x onerror=\"document.body.dataset.pwned='1'\">Mira"
    job_id = tenant.submit(
        "character_card",
        {"concept": "A storm collector", "name": name, "lorebook_entries": 0},
    )["id"]
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=45_000)
    card = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]["data"]
    expect(page.locator("#card-name")).to_have_text(card["name"])
    assert page.locator("#card-view img").count() == 0
    assert page.evaluate("document.body.dataset.pwned") is None


def create_batch(tenant: Tenant, prompts: list[str]) -> dict:
    items = [{"kind": "chat", "input": {"prompt": prompt}} for prompt in prompts]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def test_a_batch_appears_on_the_batch_page_and_runs_to_all_succeeded(
    page: Page, tenant: Tenant
) -> None:
    batch = create_batch(tenant, [f"[[sim tokens=30 tps=30]] item {i}" for i in range(3)])
    page.click("#batches-link")
    link = page.locator(f"tr[data-batch-id='{batch['id']}'] a")
    expect(link).to_be_visible(timeout=10_000)
    link.click()
    expect(page.locator("#batch-id")).to_have_text(batch["id"])
    expect(page.locator("#batch-count-succeeded")).to_have_text("3", timeout=30_000)
    expect(page.locator("#batch-state")).to_have_text("done")
    expect(page.locator("#batch-progress-text")).to_contain_text("3 of 3 finished")
    expect(page.locator("#batch-cost")).to_have_text(USD)
    expect(page.locator("#cancel-batch")).to_be_disabled()

    with page.expect_download() as download_info:
        page.click("#download-batch")
    download = download_info.value
    assert download.suggested_filename == f"batch-{batch['id']}.jsonl"
    with open(download.path(), encoding="utf-8") as downloaded:
        lines = [json.loads(line) for line in downloaded if line.strip()]
    assert [line["item"] for line in lines] == [0, 1, 2]
    assert {line["status"] for line in lines} == {"succeeded"}


def test_a_batch_of_slow_jobs_is_canceled_from_its_page(page: Page, tenant: Tenant) -> None:
    batch = create_batch(tenant, [f"[[sim ttft=30]] slow item {i}" for i in range(3)])
    page.goto(f"/#/batches/{batch['id']}")
    expect(page.locator("#batch-state")).to_have_text("running", timeout=10_000)
    page.click("#cancel-batch")
    expect(page.locator("#batch-count-canceled")).to_have_text("3", timeout=30_000)
    expect(page.locator("#batch-state")).to_have_text("canceled")
    assert tenant.get(f"/api/v1/batches/{batch['id']}").get_json()["counts"]["canceled"] == 3


# Every thumbnail on the page, whether it loaded and decoded, and its pixels.
THUMBNAILS = """() => [...document.querySelectorAll("#image-list img")].map((img) => ({
    src: img.getAttribute("src"),
    loaded: img.complete && img.naturalWidth > 0,
    width: img.naturalWidth,
    height: img.naturalHeight,
}))"""


def decoded_thumbnails(page: Page, count: int) -> list[dict]:
    """Waits (by the images' own load state) for `count` thumbnails that have decoded."""
    page.wait_for_function(
        """(count) => {
            const images = [...document.querySelectorAll("#image-list img")];
            const decoded = images.filter((img) => img.complete && img.naturalWidth > 0);
            return images.length === count && decoded.length === count;
        }""",
        arg=count,
        timeout=30_000,
    )
    return page.evaluate(THUMBNAILS)


def artifacts(tenant: Tenant, job_id: str) -> list[dict]:
    return tenant.get(f"/api/v1/jobs/{job_id}/artifacts").get_json()["items"]


def test_an_image_job_from_the_form_shows_its_images_and_downloads_them(
    page: Page, tenant: Tenant
) -> None:
    # A size no OpenAI model makes: the workflow sends it to ComfyUI (the simulator's).
    width, height = 320, 192
    page.select_option("#kind", "image")
    page.fill("#kind-fields [name=prompt]", "a paper crane over a harbour <b>at dusk</b>")
    page.fill("#kind-fields [name=width]", str(width))
    page.fill("#kind-fields [name=height]", str(height))
    page.fill("#kind-fields [name=count]", "2")
    page.fill("#kind-fields [name=workflow]", "txt2img")
    page.click("#new-job button[type=submit]")
    page.wait_for_url(JOB_PAGE)
    job_id = JOB_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    expect(page.locator("#image-view")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)

    thumbnails = decoded_thumbnails(page, 2)
    assert [(t["loaded"], t["width"], t["height"]) for t in thumbnails] == [
        (True, width, height)
    ] * 2
    listed = artifacts(tenant, job_id)
    assert [(a["width"], a["height"]) for a in listed] == [(width, height)] * 2
    # Each by its signed URL: the artifact's own path, with no API key in it.
    for thumbnail, artifact in zip(thumbnails, listed, strict=True):
        assert thumbnail["src"].startswith(f"{artifact['links']['self']}?expires=")
        assert "signature=" in thumbnail["src"] and tenant.key not in thumbnail["src"]

    links = page.locator("#image-list a.download")
    expect(links).to_have_count(2)
    assert [links.nth(i).get_attribute("download") for i in range(2)] == [a["name"] for a in listed]
    with page.expect_download() as download_info:
        links.nth(1).click()
    download = download_info.value
    assert download.suggested_filename == listed[1]["name"]
    with open(download.path(), "rb") as downloaded:
        assert hashlib.sha256(downloaded.read()).hexdigest() == listed[1]["sha256"]
    assert page.locator("#images-error").inner_text() == ""


def test_an_expired_image_url_is_renewed_from_a_fresh_list(page: Page, tenant: Tenant) -> None:
    job_id = tenant.submit(
        "image", {"prompt": "a lantern", "workflow": "txt2img", "width": 128, "height": 96}
    )["id"]
    assert tenant.wait_for(job_id, timeout=30)["status"] == "succeeded"
    listings: list[int] = []

    def expire_the_first_listing(route: Route) -> None:
        # The first list the page gets has URLs that already expired, as after a tab slept
        # past CONVEYOR_ARTIFACT_URL_TTL: the server refuses them with a 403.
        response = route.fetch()
        listing = response.json()
        listings.append(len(listing["items"]))
        if len(listings) == 1:
            for item in listing["items"]:
                path = item["url"].split("?")[0]
                item["url"] = f"{path}?expires=1&signature=stale"
                item["url_expires_at"] = "2000-01-01T00:00:00Z"
        route.fulfill(response=response, json=listing)

    page.route(f"**/api/v1/jobs/{job_id}/artifacts", expire_the_first_listing)
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    thumbnail = decoded_thumbnails(page, 1)[0]
    assert (thumbnail["width"], thumbnail["height"]) == (128, 96)
    assert "signature=stale" not in thumbnail["src"]
    assert listings == [1, 1]
    assert page.locator("#images-error").inner_text() == ""


def create_canvas(tenant: Tenant, **body: object) -> dict:
    response = tenant.post("/api/v1/canvases", json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def canvas_objects(tenant: Tenant, canvas_id: str) -> list[dict]:
    return tenant.get(f"/api/v1/canvases/{canvas_id}").get_json()["objects"]


def drawn_objects(page: Page) -> list[dict]:
    """The canvas's SVG objects as the page stacks them, bottom to top."""
    return page.evaluate(
        """() => [...document.querySelectorAll("#canvas-objects > [data-object-id]")].map(
            (g) => ({ id: g.dataset.objectId, type: g.dataset.type, state: g.dataset.state })
        )"""
    )


def wait_for_drawn(page: Page, count: int) -> list[dict]:
    page.wait_for_function(
        "(n) => document.querySelectorAll('#canvas-objects > [data-object-id]').length === n",
        arg=count,
        timeout=30_000,
    )
    return drawn_objects(page)


def image_artifact(tenant: Tenant, width: int, height: int) -> dict:
    job_input = {"prompt": "a pebble", "workflow": "txt2img", "width": width, "height": height}
    job_id = tenant.submit("image", job_input)["id"]
    assert tenant.wait_for(job_id, timeout=30)["status"] == "succeeded"
    return artifacts(tenant, job_id)[0]


MARKUP = "<img src=x onerror=\"document.body.dataset.pwned='1'\">"


def test_a_canvas_job_from_the_form_draws_every_object_of_its_canvas(
    page: Page, tenant: Tenant
) -> None:
    picture = image_artifact(tenant, 128, 96)
    first_objects = [
        {"type": "rectangle", "x": 40, "y": 40, "width": 200, "height": 90, "fill": "#dbeafe",
         "text": f"{MARKUP}Build"},
        {"type": "ellipse", "x": 300, "y": 40, "width": 120, "height": 80, "rotation": 30},
        {"type": "line", "x": 40, "y": 200, "width": 200, "height": 0, "text": "then"},
        {"type": "arrow", "x": 240, "y": 85, "width": 60, "height": -20},
        {"type": "text", "x": 40, "y": 260, "width": 300, "height": 40, "text": "Release plan"},
        {"type": "sticky_note", "x": 480, "y": 30, "width": 160, "height": 160,
         "text": f"ship {MARKUP} Friday?"},
        {"type": "image", "x": 660, "y": 40, "width": 128, "height": 96,
         "artifact_id": picture["id"]},
    ]  # fmt: skip
    canvas = create_canvas(
        tenant, name=f"{MARKUP}board", width=1000, height=600, objects=first_objects
    )

    page.select_option("#kind", "canvas")
    page.fill("#kind-fields [name=canvas_id]", canvas["id"])
    page.fill("#kind-fields [name=prompt]", f"a flow chart of our release {MARKUP}")
    page.fill("#kind-fields [name=max_objects]", "5")
    page.click("#new-job button[type=submit]")
    page.wait_for_url(JOB_PAGE)
    job_id = JOB_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    expect(page.locator("#canvas-view")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)

    saved = canvas_objects(tenant, canvas["id"])
    made = [o for o in saved if o["job_id"] == job_id]
    assert 1 <= len(made) <= 5 and len(saved) == len(first_objects) + len(made)
    drawn = wait_for_drawn(page, len(saved))
    # Every object, stacked as the API orders them (bottom to top).
    assert [(d["id"], d["type"]) for d in drawn] == [(o["id"], o["type"]) for o in saved]
    expect(page.locator("#canvas-svg")).to_have_attribute("viewBox", "0 0 1000 600")
    expect(page.locator("#canvas-name")).to_have_text(canvas["name"])
    expect(page.locator("#canvas-facts")).to_contain_text(f"{len(saved)} objects")

    # Text stays text: the labels read as written, and nothing in them ran or became an element.
    rectangle = page.locator(f"[data-object-id='{saved[0]['id']}']")
    expect(rectangle).to_have_text(first_objects[0]["text"])
    assert page.locator("#canvas-view img").count() == 0
    assert page.evaluate("document.body.dataset.pwned") is None

    # The image object shows the artifact's pixels, read with the key.
    image = page.locator(f"[data-object-id='{saved[6]['id']}']")
    expect(image).to_have_attribute("data-state", "loaded", timeout=15_000)
    size = page.evaluate(
        """async (id) => {
            const image = document.querySelector(`[data-object-id="${id}"] image`);
            const img = new Image();
            img.src = image.getAttribute("href");
            await img.decode();
            return [img.naturalWidth, img.naturalHeight];
        }""",
        saved[6]["id"],
    )
    assert size == [128, 96]

    # Opened afresh, the page draws the same canvas from GET alone.
    page.reload()
    expect(page.locator("#job-status")).to_have_text("succeeded")
    assert [d["id"] for d in wait_for_drawn(page, len(saved))] == [o["id"] for o in saved]


def test_objects_saved_by_another_job_appear_live_from_the_canvas_room(
    page: Page, tenant: Tenant
) -> None:
    canvas = create_canvas(tenant, name="live board", width=800, height=600)
    first = tenant.submit(
        "canvas", {"canvas_id": canvas["id"], "prompt": "boxes", "max_objects": 2}
    )
    assert tenant.wait_for(first["id"], timeout=30)["status"] == "succeeded"
    before = canvas_objects(tenant, canvas["id"])

    # Once the page has joined the room and drawn the canvas, GET /canvases/{id} answers with
    # what the canvas held then: whatever is drawn after that can only have come from the room.
    snapshot: list[dict] = []
    frozen: list[bool] = []

    def freeze_the_canvas(route: Route) -> None:
        if frozen:
            route.fulfill(json=snapshot[0])
            return
        response = route.fetch()
        snapshot[:] = [response.json()]
        route.fulfill(response=response)

    page.route(f"**/api/v1/canvases/{canvas['id']}", freeze_the_canvas)
    page.goto(f"/#/jobs/{first['id']}")
    expect(page.locator("#canvas-view")).to_have_attribute("data-subscribed", "true")
    wait_for_drawn(page, len(before))
    frozen.append(True)

    second = tenant.submit(
        "canvas",
        {"canvas_id": canvas["id"], "prompt": "[[sim ttft=0.5]] circles", "max_objects": 3},
    )
    assert tenant.wait_for(second["id"], timeout=30)["status"] == "succeeded"
    after = canvas_objects(tenant, canvas["id"])
    assert len(after) > len(before)
    drawn = wait_for_drawn(page, len(after))
    assert [d["id"] for d in drawn] == [o["id"] for o in after]
    expect(page.locator("#canvas-notice")).to_contain_text(f"Job {second['id'][:8]}: saved")
    assert snapshot[0]["object_count"] == len(before)


def test_without_websockets_a_canvas_job_draws_its_objects_when_it_ends(
    context: BrowserContext, tenant: Tenant
) -> None:
    # No room to hear: the job's own events (long-polled) say when to read the canvas again.
    page = context.new_page()
    without_socketio(page)
    sign_in(page, tenant, connection="polling")
    canvas = create_canvas(tenant, name="polled board", width=640, height=480)
    job_input = {"canvas_id": canvas["id"], "prompt": "[[sim ttft=1]] a chart", "max_objects": 3}
    job_id = tenant.submit("canvas", job_input)["id"]
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#canvas-view")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)
    saved = canvas_objects(tenant, canvas["id"])
    assert saved and all(o["job_id"] == job_id for o in saved)
    assert [d["id"] for d in wait_for_drawn(page, len(saved))] == [o["id"] for o in saved]
    assert page.locator("#canvas-view").get_attribute("data-subscribed") is None


def test_the_home_page_shows_the_spend_and_the_budget_left(
    context: BrowserContext, tenant: Tenant
) -> None:
    job = tenant.wait_for(tenant.submit("chat", {"prompt": "[[sim tokens=40]] spend"})["id"])
    cost = job["usage"]["cost_usd"]
    page = sign_in(context.new_page(), tenant)
    expect(page.locator("#spend-today")).to_have_text(f"${cost} (no limit)")
    with runtime().db.transaction() as session:
        budgets.put_tenant(session, tenant.owner, {"daily_budget_usd": Decimal("2")})
    page.reload()
    left = f"{Decimal(2) - Decimal(cost):.8f}"
    expect(page.locator("#spend-today")).to_have_text(f"${cost} of $2.00000000, ${left} left")
    expect(page.locator("#spend-month")).to_have_text(f"${cost} (no limit)")
