"""API key scopes, expiry and last use, and the admin's key routes (`/keys`), over HTTP, the
Socket.IO server of the real web process and both command lines."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import socketio
import sqlalchemy as sa
from click.testing import CliRunner
from flask import Flask

from app.cli.client import main
from app.keys.api_keys import clear_key_cache, create_api_key
from app.migrate import upgrade
from app.models import ApiKey
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job, wait_until
from tests.integration.test_cli import api_url  # noqa: F401  (the fixture)
from tests.integration.test_realtime import refusal
from tests.integration.test_revocation import BackgroundStream
from tests.webserver import WebServer

pytestmark = pytest.mark.usefixtures("worker")

READ, WRITE, ADMIN = "jobs:read", "jobs:write", "admin"


@pytest.fixture
def keyed(app: Flask) -> Callable[..., Tenant]:
    """A tenant whose key has the given scopes (and expiry)."""

    def make(*scopes: str, owner: str | None = None, expires_at: datetime | None = None) -> Tenant:
        owner = owner or f"tenant-{uuid.uuid4().hex[:10]}"
        key = create_api_key(runtime().db, owner, scopes=scopes, expires_at=expires_at)
        return Tenant(owner, key, app.test_client())

    return make


@pytest.fixture
def admin(keyed: Callable[..., Tenant]) -> Tenant:
    return keyed(ADMIN, owner=f"ops-{uuid.uuid4().hex[:8]}")


def assert_needs(response: Any, scope: str) -> None:
    assert response.status_code == 403, response.get_json()
    assert response.content_type == "application/problem+json"
    problem = response.get_json()
    assert problem["type"] == "/problems/insufficient-scope"
    assert problem["scope"] == scope and repr(scope) in problem["detail"]
    assert f'scope="{scope}"' in response.headers["WWW-Authenticate"]


def field_of(response: Any) -> list[str]:
    assert response.status_code == 422, response.get_json()
    return [error["field"] for error in response.get_json()["errors"]]


# Scopes --------------------------------------------------------------------------------------


def test_a_read_only_key_reads_and_is_refused_every_write(keyed: Callable[..., Tenant]) -> None:
    reader = keyed(READ)
    job_id = undispatched_job(reader.owner)
    assert reader.get("/api/v1/jobs").status_code == 200
    assert reader.get(f"/api/v1/jobs/{job_id}").status_code == 200
    assert reader.get(f"/api/v1/jobs/{job_id}/events").status_code == 200
    assert reader.get("/api/v1/stats").status_code == 200
    assert reader.post("/api/v1/realtime/token", json={}).status_code in (201, 503)
    chat = {"kind": "chat", "input": {"prompt": "hi"}}
    writes = [
        reader.post("/api/v1/jobs", json=chat),
        reader.post("/api/v1/batches", json={"items": [chat]}),
        reader.post("/api/v1/canvases", json={"name": "c", "width": 10, "height": 10}),
        reader.post(f"/api/v1/jobs/{job_id}/cancel"),
        reader.post(f"/api/v1/jobs/{job_id}/retry"),
        reader.delete(f"/api/v1/jobs/{job_id}"),
    ]
    for response in writes:
        assert_needs(response, WRITE)
    assert reader.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "queued"
    assert_needs(reader.get("/api/v1/keys"), ADMIN)
    assert_needs(reader.get("/api/v1/admin/jobs"), ADMIN)


def test_a_write_only_key_writes_and_reads_nothing(keyed: Callable[..., Tenant]) -> None:
    writer = keyed(WRITE)
    created = writer.post("/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "w"}})
    assert created.status_code == 202
    job_id = created.get_json()["id"]
    assert_needs(writer.get("/api/v1/jobs"), READ)
    assert_needs(writer.get(f"/api/v1/jobs/{job_id}"), READ)
    assert_needs(writer.get(f"/api/v1/jobs/{job_id}/events"), READ)
    assert_needs(writer.get("/api/v1/jobs/export"), READ)
    assert_needs(writer.post("/api/v1/realtime/token", json={}), READ)  # a token reads
    assert writer.post(f"/api/v1/jobs/{job_id}/cancel").status_code in (200, 202, 409)


def test_an_admin_only_key_manages_keys_and_reads_no_jobs(admin: Tenant) -> None:
    assert admin.get("/api/v1/keys").status_code == 200
    assert_needs(admin.get("/api/v1/jobs"), READ)
    assert_needs(admin.post("/api/v1/jobs", json={"kind": "chat", "input": {}}), WRITE)


def test_scope_is_checked_after_the_key_and_before_the_input(keyed: Callable[..., Tenant]) -> None:
    reader = keyed(READ)
    assert reader.post("/api/v1/jobs", json={"kind": 5}).status_code == 403
    nobody = reader.client.post("/api/v1/jobs", json={"kind": 5})
    assert nobody.status_code == 401


def test_a_key_without_jobs_read_cannot_open_a_socket(
    web_server: WebServer, keyed: Callable[..., Tenant]
) -> None:
    writer = keyed(WRITE)
    assert "forbidden" in refusal(web_server, {"api_key": writer.key})
    assert "jobs:read" in refusal(web_server, {"api_key": writer.key})


def test_the_openapi_document_names_each_operations_scope(tenant: Tenant) -> None:
    paths = tenant.get("/api/v1/openapi.json").get_json()["paths"]
    assert paths["/api/v1/jobs"]["get"]["security"] == [{"bearer": [READ]}]
    assert paths["/api/v1/jobs"]["post"]["security"] == [{"bearer": [WRITE]}]
    assert paths["/api/v1/keys"]["post"]["security"] == [{"bearer": [ADMIN]}]
    assert paths["/api/v1/realtime/token"]["post"]["security"] == [{"bearer": [READ]}]
    assert "403" in paths["/api/v1/jobs"]["post"]["responses"]


# Keys over the API ------------------------------------------------------------------------------


def test_an_admin_creates_a_key_that_works_lists_it_and_revokes_it(
    admin: Tenant, app: Flask
) -> None:
    owner = f"tenant-{uuid.uuid4().hex[:10]}"
    response = admin.post(
        "/api/v1/keys", json={"owner": owner, "name": "ci", "scopes": ["jobs:write", "jobs:read"]}
    )
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert response.headers["Location"] == created["links"]["self"]
    assert created["key"].startswith("cvk_") and created["prefix"] == created["key"][:12]
    assert created["scopes"] == [READ, WRITE] and created["state"] == "active"
    assert created["owner"] == owner and created["expires_at"] is None
    admin_key_id = admin.get("/api/v1/keys", query_string={"owner": admin.owner}).get_json()
    assert created["created_by"] == admin_key_id["items"][0]["id"]

    new = Tenant(owner, created["key"], app.test_client())
    assert new.submit("chat", {"prompt": "from a key made over the API"})["kind"] == "chat"

    listed = admin.get("/api/v1/keys", query_string={"owner": owner}).get_json()["items"]
    assert [key["id"] for key in listed] == [created["id"]]
    assert "key" not in listed[0] and created["key"] not in json.dumps(listed)
    shown = admin.get(f"/api/v1/keys/{created['id']}").get_json()
    assert shown["last_used_at"] is not None and "key" not in shown

    revoked = admin.delete(f"/api/v1/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.get_json()["state"] == "revoked"
    assert new.get("/api/v1/jobs").status_code == 401
    again = admin.delete(f"/api/v1/keys/{created['id']}").get_json()
    assert again["revoked_at"] == revoked.get_json()["revoked_at"]
    by_state = admin.get("/api/v1/keys", query_string={"owner": owner, "state": "revoked"})
    assert [key["id"] for key in by_state.get_json()["items"]] == [created["id"]]
    assert (
        admin.get("/api/v1/keys", query_string={"owner": owner, "state": "active"}).get_json()[
            "items"
        ]
        == []
    )
    assert admin.delete(f"/api/v1/keys/{uuid.uuid4()}").status_code == 404


def test_a_key_defaults_to_the_callers_owner_and_both_job_scopes(admin: Tenant) -> None:
    created = admin.post("/api/v1/keys", json={}).get_json()
    assert created["owner"] == admin.owner and created["scopes"] == [READ, WRITE]
    assert created["name"] == "default"


def test_the_key_list_pages_past_its_limit(admin: Tenant) -> None:
    owner = f"tenant-{uuid.uuid4().hex[:10]}"
    made = [admin.post("/api/v1/keys", json={"owner": owner}).get_json()["id"] for _ in range(3)]
    seen, cursor = [], None
    while True:
        query = {"owner": owner, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = admin.get("/api/v1/keys", query_string=query).get_json()
        seen += [key["id"] for key in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == made[::-1]
    assert field_of(admin.get("/api/v1/keys", query_string={"limit": 101})) == ["limit"]
    assert field_of(admin.get("/api/v1/keys", query_string={"cursor": "nope"})) == ["cursor"]
    assert field_of(admin.get("/api/v1/keys", query_string={"state": "lost"})) == ["state"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scopes": ["jobs:delete"]}, "scopes.0"),
        ({"scopes": []}, "scopes"),
        ({"scopes": [READ, READ]}, "scopes"),
        ({"scopes": [READ, WRITE, ADMIN, READ]}, "scopes"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"name": ""}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"owner": "o" * 201}, "owner"),
        ({"role": "admin"}, "role"),
    ],
)
def test_a_bad_key_request_is_a_422_naming_the_field(
    admin: Tenant, body: dict[str, Any], field: str
) -> None:
    response = admin.post("/api/v1/keys", json=body)
    assert response.content_type == "application/problem+json"
    assert field_of(response) == [field]


def test_the_longest_name_and_owner_are_accepted(admin: Tenant) -> None:
    body = {"name": "n" * 200, "owner": "o" * 199 + uuid.uuid4().hex[:1]}
    assert admin.post("/api/v1/keys", json=body).status_code == 201


# Expiry and last use --------------------------------------------------------------------------


def test_an_expired_key_is_refused_at_once_though_cached(keyed: Callable[..., Tenant]) -> None:
    soon = keyed(READ, WRITE, expires_at=datetime.now(UTC) + timedelta(seconds=2))
    assert soon.get("/api/v1/jobs").status_code == 200  # now cached in this process
    token = soon.post("/api/v1/realtime/token", json={}).get_json()
    assert token["expires_in"] <= 2  # a token never outlives its key
    time.sleep(2.2)
    refused = soon.get("/api/v1/jobs")
    assert refused.status_code == 401
    assert "expired" in refused.get_json()["detail"]


def test_an_expired_keys_token_and_connections_are_cut_off(
    web_server: WebServer, keyed: Callable[..., Tenant]
) -> None:
    expires_at = datetime.now(UTC) + timedelta(seconds=6)
    soon = keyed(READ, WRITE, expires_at=expires_at)
    job_id = str(undispatched_job(soon.owner))
    minted = soon.post("/api/v1/realtime/token", json={}).get_json()["token"]
    cut_off = threading.Event()
    client = socketio.Client(reconnection=False)
    client.on("disconnect", lambda *_reason: cut_off.set())
    client.connect(web_server.url, auth={"token": minted}, transports=["websocket"])
    stream = BackgroundStream()
    thread = stream.read(web_server, soon, job_id)
    try:
        wait_until(lambda: stream.events, timeout=10)
        assert not stream.ended.is_set() and client.connected
        assert cut_off.wait(20), "the connection outlived its key"
        assert stream.ended.wait(20), "the stream outlived its key"
        assert datetime.now(UTC) >= expires_at
        assert "expired" in refusal(web_server, {"token": minted})
        assert "unauthorized" in refusal(web_server, {"api_key": soon.key})
    finally:
        client.disconnect()
        thread.join(10)


def _last_used(key: str) -> datetime | None:
    with runtime().db.transaction() as session:
        return session.scalar(sa.select(ApiKey.last_used_at).where(ApiKey.prefix == key[:12]))


def _age_last_use(key: str, seconds: int) -> None:
    with runtime().db.transaction() as session:
        session.execute(
            sa.update(ApiKey)
            .where(ApiKey.prefix == key[:12])
            .values(last_used_at=sa.func.now() - timedelta(seconds=seconds))
        )
    clear_key_cache()


def test_last_use_is_written_at_most_once_a_minute(tenant: Tenant) -> None:
    assert _last_used(tenant.key) is None
    tenant.get("/api/v1/jobs")
    first = _last_used(tenant.key)
    assert first is not None
    _age_last_use(tenant.key, 30)
    aged = _last_used(tenant.key)
    tenant.get("/api/v1/jobs")  # loaded again, within the minute: not written
    assert _last_used(tenant.key) == aged
    _age_last_use(tenant.key, 61)
    tenant.get("/api/v1/jobs")  # a minute later: written
    assert _last_used(tenant.key) > datetime.now(UTC) - timedelta(seconds=10)


# Command lines -----------------------------------------------------------------------------------


def test_conveyor_keys_create_list_revoke(api_url: str, admin: Tenant) -> None:  # noqa: F811
    owner = f"tenant-{uuid.uuid4().hex[:10]}"

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["--url", api_url, "--key", admin.key, "keys", *args])

    made = run(
        "create",
        "--owner",
        owner,
        "--name",
        "cli",
        "--scope",
        READ,
        "--expires-at",
        "2099-01-01T00:00:00Z",
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("cvk_")
    answer = httpx.get(f"{api_url}/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 200
    listed = run("list", "--owner", owner)
    assert listed.exit_code == 0 and secret[:12] in listed.output and "2099-01-01" in listed.output
    key_id = admin.get("/api/v1/keys", query_string={"owner": owner}).get_json()["items"][0]["id"]
    revoked = run("revoke", key_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    bad = run("create", "--owner", owner, "--expires-at", "2001-01-01")
    assert bad.exit_code != 0 and "expires_at" in bad.output
    reader = CliRunner().invoke(main, ["--url", api_url, "--key", secret, "keys", "list"])
    assert reader.exit_code != 0


def test_flask_keys_create_takes_scopes_and_an_expiry(app: Flask) -> None:
    owner = f"tenant-{uuid.uuid4().hex[:10]}"
    runner = app.test_cli_runner()
    result = runner.invoke(
        args=["keys", "create", "--owner", owner, "--scope", "admin", "--expires-at", "2099-01-01"]
    )
    assert result.exit_code == 0, result.output
    key = result.output.strip()
    with runtime().db.transaction() as session:
        row = session.scalars(sa.select(ApiKey).where(ApiKey.prefix == key[:12])).one()
        assert row.scopes == [ADMIN] and row.expires_at == datetime(2099, 1, 1, tzinfo=UTC)
    past = runner.invoke(args=["keys", "create", "--owner", owner, "--expires-at", "2001-01-01"])
    assert past.exit_code != 0 and "future" in past.output


# The migration -----------------------------------------------------------------------------------


def test_migration_0008_gives_existing_keys_the_scopes_of_their_role(postgres) -> None:
    url = postgres.create_database(f"keys_{uuid.uuid4().hex[:8]}")
    upgrade(url, "0007")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for role in ("user", "admin"):
                connection.execute(
                    sa.text(
                        "INSERT INTO api_keys (id, name, owner, role, prefix, key_hash) "
                        "VALUES (gen_random_uuid(), 'old', 'o', :role, :role, :role)"
                    ),
                    {"role": role},
                )
        upgrade(url)
        with engine.begin() as connection:
            scopes = dict(connection.execute(sa.text("SELECT role, scopes FROM api_keys")).all())
            # A key the previous release creates meanwhile (it names no scopes) still works.
            connection.execute(
                sa.text(
                    "INSERT INTO api_keys (id, name, owner, role, prefix, key_hash) "
                    "VALUES (gen_random_uuid(), 'old', 'o', 'user', 'x', 'x')"
                )
            )
            later = connection.scalar(sa.text("SELECT scopes FROM api_keys WHERE prefix = 'x'"))
    finally:
        engine.dispose()
    assert scopes == {"user": [READ, WRITE], "admin": [ADMIN, READ, WRITE]}
    assert later == [READ, WRITE]
