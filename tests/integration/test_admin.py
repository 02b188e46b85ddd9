"""The admin's views across owners: every owner's jobs, bulk cancel and retry by a filter,
failures by error code; and that only a key with the `admin` scope sees them."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from app.jobs.bulk import MAX_BULK
from app.models import Job, JobEvent
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job

pytestmark = pytest.mark.usefixtures("worker")


def finished_job(owner: str, status: str, code: str | None = None, ago: float = 0) -> uuid.UUID:
    """A job that ended `ago` seconds ago, stored as a worker would have left it."""
    job_id = undispatched_job(owner)
    with runtime().db.transaction() as session:
        session.execute(
            sa.update(Job)
            .where(Job.id == job_id)
            .values(
                status=status,
                error_code=code,
                error_message=code and f"{code} happened",
                finished_at=sa.func.now() - timedelta(seconds=ago),
            )
        )
    return job_id


def statuses(*job_ids: uuid.UUID) -> list[str]:
    with runtime().db.transaction() as session:
        rows = dict(session.execute(sa.select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())
    return [rows[job_id] for job_id in job_ids]


def field_of(response: Any) -> list[str]:
    assert response.status_code == 422, response.get_json()
    assert response.content_type == "application/problem+json"
    return [error["field"] for error in response.get_json()["errors"]]


def test_only_an_admin_key_sees_the_admin_routes(tenant: Tenant, admin: Tenant) -> None:
    routes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("get", "/api/v1/admin/jobs", None),
        ("post", "/api/v1/admin/jobs/cancel", {"filter": {"owner": tenant.owner}}),
        ("post", "/api/v1/admin/jobs/retry", {"filter": {"owner": tenant.owner}}),
        ("get", "/api/v1/admin/failures", None),
        ("get", "/api/v1/keys", None),
        ("post", "/api/v1/keys", {}),
    ]
    for method, path, body in routes:
        kwargs = {"json": body} if body is not None else {}
        refused = getattr(tenant, method)(path, **kwargs)
        assert refused.status_code == 403, path
        assert refused.get_json()["scope"] == "admin"
        assert getattr(admin, method)(path, **kwargs).status_code in (200, 201), path


def test_the_admin_lists_every_owners_jobs_with_their_owner(
    admin: Tenant, new_tenant: Callable[[], Tenant]
) -> None:
    first, second = new_tenant(), new_tenant()
    older = undispatched_job(first.owner)
    newer = undispatched_job(second.owner)
    page = admin.get("/api/v1/admin/jobs", query_string={"limit": 100}).get_json()
    listed = {item["id"]: item["owner"] for item in page["items"]}
    assert listed[str(older)] == first.owner and listed[str(newer)] == second.owner
    ids = [item["id"] for item in page["items"]]
    assert ids.index(str(newer)) < ids.index(str(older))  # newest first

    mine = admin.get("/api/v1/admin/jobs", query_string={"owner": first.owner}).get_json()
    assert [item["id"] for item in mine["items"]] == [str(older)]
    # Tenants still see only their own.
    assert [job["id"] for job in first.get("/api/v1/jobs").get_json()["items"]] == [str(older)]


def test_the_admin_job_list_filters_and_pages(admin: Tenant, tenant: Tenant) -> None:
    made = [undispatched_job(tenant.owner) for _ in range(3)]
    done = finished_job(tenant.owner, "failed", "model_timeout")
    seen, cursor = [], None
    while True:
        query = {"owner": tenant.owner, "status": "queued", "limit": 2}
        page = admin.get(
            "/api/v1/admin/jobs", query_string=query | ({"cursor": cursor} if cursor else {})
        )
        body = page.get_json()
        seen += [item["id"] for item in body["items"]]
        if not (cursor := body["next_cursor"]):
            break
    assert seen == [str(job) for job in reversed(made)]
    failed = admin.get(
        "/api/v1/admin/jobs", query_string={"owner": tenant.owner, "status": "failed"}
    ).get_json()["items"]
    assert [item["id"] for item in failed] == [str(done)]
    assert failed[0]["error"]["code"] == "model_timeout"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "lost"}, "status"),
        ({"limit": 101}, "limit"),
        ({"limit": 0}, "limit"),
        ({"owner": ""}, "owner"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "2026-01-02", "created_before": "2026-01-01"}, "created_before"),
        ({"cursor": "nope"}, "cursor"),
        ({"tenant": "x"}, "tenant"),
    ],
)
def test_a_bad_admin_filter_is_a_422_naming_it(
    admin: Tenant, query: dict[str, Any], field: str
) -> None:
    assert field_of(admin.get("/api/v1/admin/jobs", query_string=query)) == [field]


def test_bulk_cancel_is_bounded_per_call_and_says_when_more_match(
    admin: Tenant, tenant: Tenant
) -> None:
    jobs = [undispatched_job(tenant.owner) for _ in range(3)]
    done = finished_job(tenant.owner, "succeeded")
    body = {"filter": {"owner": tenant.owner}, "limit": 2}
    first = admin.post("/api/v1/admin/jobs/cancel", json=body)
    assert first.status_code == 200, first.get_json()
    assert first.get_json() == {"canceled": 2, "stopping": 0, "more": True}
    assert statuses(*jobs) == ["queued", "canceled", "canceled"]  # newest first
    second = admin.post("/api/v1/admin/jobs/cancel", json=body).get_json()
    assert second == {"canceled": 1, "stopping": 0, "more": False}
    assert statuses(*jobs, done) == ["canceled"] * 3 + ["succeeded"]
    third = admin.post("/api/v1/admin/jobs/cancel", json=body).get_json()
    assert third == {"canceled": 0, "stopping": 0, "more": False}
    # Each canceled job has its event, as if it were canceled alone.
    events = tenant.get(f"/api/v1/jobs/{jobs[0]}/events").get_json()["items"]
    assert [event["type"] for event in events] == ["job.queued", "job.canceled"]
    assert events[-1]["data"] == {"reason": "requested"}


def test_bulk_cancel_tells_running_jobs_to_stop_once(admin: Tenant, tenant: Tenant) -> None:
    job = tenant.submit("chat", {"prompt": "[[sim tokens=2000 tps=20]] slow"})
    tenant.wait_for(job["id"], "running")
    body = {"filter": {"owner": tenant.owner, "status": "running"}}
    told = admin.post("/api/v1/admin/jobs/cancel", json=body).get_json()
    assert told == {"canceled": 0, "stopping": 1, "more": False}
    again = admin.post("/api/v1/admin/jobs/cancel", json=body).get_json()
    assert again["stopping"] == 0
    assert tenant.wait_for(job["id"])["status"] == "canceled"


def test_bulk_cancel_reaches_only_the_filtered_owner(
    admin: Tenant, new_tenant: Callable[[], Tenant]
) -> None:
    target, bystander = new_tenant(), new_tenant()
    theirs, other = undispatched_job(target.owner), undispatched_job(bystander.owner)
    admin.post("/api/v1/admin/jobs/cancel", json={"filter": {"owner": target.owner}})
    assert statuses(theirs, other) == ["canceled", "queued"]


@pytest.mark.parametrize("action", ["cancel", "retry"])
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "filter"),
        ({"filter": {}}, "filter"),
        ({"filter": {"owner": None}}, "filter"),
        ({"filter": {"owner": "x"}, "limit": MAX_BULK + 1}, "limit"),
        ({"filter": {"owner": "x"}, "limit": 0}, "limit"),
        ({"filter": {"owner": "x", "colour": "red"}}, "filter.colour"),
        ({"filter": {"status": "finished"}}, "filter.status"),
    ],
)
def test_a_bad_bulk_request_is_a_422_naming_the_field(
    admin: Tenant, action: str, body: dict[str, Any], field: str
) -> None:
    assert field_of(admin.post(f"/api/v1/admin/jobs/{action}", json=body)) == [field]


@pytest.mark.parametrize(("action", "status"), [("cancel", "failed"), ("retry", "queued")])
def test_a_bulk_action_refuses_a_status_it_cannot_act_on(
    admin: Tenant, action: str, status: str
) -> None:
    body = {"filter": {"status": status}}
    assert field_of(admin.post(f"/api/v1/admin/jobs/{action}", json=body)) == ["filter.status"]


def test_the_largest_bulk_limit_is_accepted(admin: Tenant, tenant: Tenant) -> None:
    body = {"filter": {"owner": tenant.owner}, "limit": MAX_BULK}
    assert admin.post("/api/v1/admin/jobs/cancel", json=body).status_code == 200


def test_bulk_retry_retries_each_failed_job_once(admin: Tenant, tenant: Tenant) -> None:
    failed = [finished_job(tenant.owner, "failed", "model_timeout") for _ in range(2)]
    canceled = finished_job(tenant.owner, "canceled")
    body = {"filter": {"owner": tenant.owner, "status": "failed"}, "limit": 1}
    first = admin.post("/api/v1/admin/jobs/retry", json=body).get_json()
    assert first["retried"] == 1 and first["more"] is True
    second = admin.post("/api/v1/admin/jobs/retry", json=body).get_json()
    assert second["retried"] == 1 and second["more"] is False
    assert admin.post("/api/v1/admin/jobs/retry", json=body).get_json()["retried"] == 0

    new_jobs = [first["jobs"][0], second["jobs"][0]]
    retried = {tenant.get(f"/api/v1/jobs/{job}").get_json()["retry_of"] for job in new_jobs}
    assert retried == {str(job) for job in failed}
    for job in new_jobs:  # dispatched: the worker runs them
        assert tenant.wait_for(job)["status"] == "succeeded"
    assert statuses(canceled) == ["canceled"]  # not chosen by status=failed
    rest = admin.post("/api/v1/admin/jobs/retry", json={"filter": {"owner": tenant.owner}})
    assert rest.get_json()["retried"] == 1  # the canceled one, now


def test_bulk_retry_stores_its_jobs_with_their_queued_event(admin: Tenant, tenant: Tenant) -> None:
    old = finished_job(tenant.owner, "failed", "model_bad_request")
    new = admin.post("/api/v1/admin/jobs/retry", json={"filter": {"owner": tenant.owner}})
    (job_id,) = new.get_json()["jobs"]
    with runtime().db.transaction() as session:
        first = session.scalars(
            sa.select(JobEvent).where(JobEvent.job_id == uuid.UUID(job_id), JobEvent.seq == 1)
        ).one()
        assert first.type == "job.queued" and first.data["retry_of"] == str(old)


def test_bulk_retry_clones_the_request_as_a_single_retry_does(
    admin: Tenant, tenant: Tenant
) -> None:
    old = finished_job(tenant.owner, "failed", "model_timeout")
    webhook = {"url": "https://hooks.example.com/conveyor", "events": ["job.failed"]}
    with runtime().db.transaction() as session:
        session.execute(
            sa.update(Job)
            .where(Job.id == old)
            .values(
                webhook=webhook,
                timeout_seconds=7,
                max_cost_usd=Decimal("0.25"),
                expires_at=Job.created_at + timedelta(seconds=600),
            )
        )
    body = {"filter": {"owner": tenant.owner, "status": "failed"}}
    (job_id,) = admin.post("/api/v1/admin/jobs/retry", json=body).get_json()["jobs"]
    with runtime().db.transaction() as session:
        new = session.get_one(Job, uuid.UUID(job_id))
        assert (new.webhook, new.timeout_seconds, new.max_cost_usd) == (
            webhook,
            7,
            Decimal("0.25"),
        )
        assert new.expires_at is not None
        assert round((new.expires_at - new.created_at).total_seconds()) == 600


def test_failures_by_code_over_a_window(admin: Tenant, tenant: Tenant) -> None:
    for code in ("model_timeout", "model_timeout", "model_timeout", "worker_lost"):
        finished_job(tenant.owner, "failed", code)
    finished_job(tenant.owner, "failed", "model_bad_request", ago=7200)
    finished_job(tenant.owner, "canceled")
    hour = admin.get("/api/v1/admin/failures", query_string={"owner": tenant.owner}).get_json()
    assert hour["window"] == 3600 and hour["total"] == 4
    assert hour["by_code"] == [
        {"code": "model_timeout", "count": 3},
        {"code": "worker_lost", "count": 1},
    ]
    day = admin.get(
        "/api/v1/admin/failures", query_string={"owner": tenant.owner, "window": 86400}
    ).get_json()
    assert day["total"] == 5
    everyone = admin.get("/api/v1/admin/failures").get_json()
    assert everyone["total"] >= 4


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"window": 0}, "window"),
        ({"window": 30 * 86400 + 1}, "window"),
        ({"window": "hour"}, "window"),
        ({"since": "x"}, "since"),
    ],
)
def test_a_bad_failures_query_is_a_422_naming_it(
    admin: Tenant, query: dict[str, Any], field: str
) -> None:
    assert field_of(admin.get("/api/v1/admin/failures", query_string=query)) == [field]


def test_the_longest_failure_window_is_accepted(admin: Tenant) -> None:
    assert (
        admin.get("/api/v1/admin/failures", query_string={"window": 30 * 86400}).status_code == 200
    )
