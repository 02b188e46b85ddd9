"""The dashboard in a real headless Chromium (driven by Playwright), against the real
web process, worker, PostgreSQL and Redis."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from app.config import Settings
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
def page(browser: Browser, dashboard_server: WebServer, tenant: Tenant) -> Iterator[Page]:
    context = browser.new_context(base_url=dashboard_server.url)
    page = context.new_page()
    page.goto("/")
    page.fill("#api-key", tenant.key)
    page.click("#sign-in-form button")
    expect(page.locator("#home")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=10_000)
    yield page
    context.close()


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
    browser: Browser, dashboard_server: WebServer, tenant: Tenant
) -> None:
    context = browser.new_context(base_url=dashboard_server.url)
    page = context.new_page()
    page.route("**/vendor/socket.io.min.js", lambda route: route.abort())  # no Socket.IO
    page.goto("/")
    page.fill("#api-key", tenant.key)
    page.click("#sign-in-form button")
    expect(page.locator("#connection")).to_have_attribute("data-state", "polling")
    job_id = submit_chat(page, "[[sim tokens=60 tps=30]] Over plain HTTP.")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=20_000)
    expect(page.locator("#job-progress-text")).to_have_text("100%")
    assert page.locator("#job-output").inner_text() == stored_text(tenant, job_id)
    context.close()


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
