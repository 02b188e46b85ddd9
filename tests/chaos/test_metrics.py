"""Metrics as Prometheus sees them: a real Prometheus (Debian's `prometheus`, installed by
`tools/require prometheus`) scrapes a running stack (gunicorn with two workers, a Celery worker
and beat, as the Procfile runs them), with the shipped alert rules loaded, and its HTTP API is
asked for the series after jobs that succeed, fail and are retried."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
import yaml
from prometheus_client import CollectorRegistry, multiprocess

from app.migrate import ROOT
from devtools.processes import free_port
from tests.chaos.conftest import Cluster, running_cluster

TOKEN = f"metrics-{uuid.uuid4().hex}"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "no prometheus binary: run tools/require prometheus (make test does)"
        print(message)
        pytest.skip(message)
    return found


@contextmanager
def prometheus(workdir: Path, web_port: int, worker_port: int) -> Iterator[httpx.Client]:
    """A private Prometheus scraping both targets every second, with the shipped rules."""
    binary = prometheus_binary()
    workdir.mkdir()
    token_file = workdir / "token"
    token_file.write_text(TOKEN)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": name,
                "authorization": {"credentials_file": str(token_file)},
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
            for name, port in (("conveyor-web", web_port), ("conveyor-worker", worker_port))
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("ab")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        wait_until(lambda: _ready(client), 30, "prometheus ready", workdir / "prometheus.log")
        yield client
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/-/ready").status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], Any], within: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + within
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log is not None else ""
            raise AssertionError(f"{what}: not within {within} s {tail}")
        time.sleep(0.25)


def query(client: httpx.Client, expr: str) -> dict[str, float]:
    """An instant query's vector: each series' labels (as `k=v,...`, '' for none) -> value."""
    answer = client.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", answer
    return {
        ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items())): float(item["value"][1])
        for item in answer["data"]["result"]
    }


def settle(client: httpx.Client, expected: dict[str, dict[str, float]], within: float) -> None:
    """Waits until every query answers its expected vector (scrapes are a second apart)."""
    seen: dict[str, dict[str, float]] = {}

    def all_equal() -> bool:
        seen.update({expr: query(client, expr) for expr in expected})
        return all(seen[expr] == wanted for expr, wanted in expected.items())

    try:
        wait_until(all_equal, within, "series")
    except AssertionError:
        wrong = {e: (seen.get(e), w) for e, w in expected.items() if seen.get(e) != w}
        raise AssertionError(f"(found, expected) per query: {wrong}") from None


def created_per_process(directory: Path) -> dict[str, float]:
    """Jobs created as each web process recorded them: its own file, read alone."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(path, alone)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=alone)
            value = sum(
                sample.value
                for family in registry.collect()
                if family.name == "conveyor_jobs_created"
                for sample in family.samples
                if sample.name == "conveyor_jobs_created_total"
            )
        if value:
            counts[path.stem] = value
    return counts


def scrape(url: str, token: str | None) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{url}/metrics", headers=headers, timeout=10)


def test_prometheus_scrapes_web_and_workers(tmp_path: Path) -> None:
    prometheus_binary()
    web_dir = tmp_path / "web-metrics"
    web_dir.mkdir()
    web_env = {"CONVEYOR_METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(web_dir)}
    with running_cluster(tmp_path, web_workers=2, web_env=web_env, ttft=0.05, tps=200) as cluster:
        assert cluster.web is not None
        worker_port = free_port()
        worker_url = f"http://127.0.0.1:{worker_port}"
        # The Procfile's pool: the metrics server runs as a greenlet beside the jobs.
        cluster.start_worker(
            pool="gevent",
            CONVEYOR_METRICS_TOKEN=TOKEN,
            CONVEYOR_WORKER_METRICS_PORT=str(worker_port),
        )
        cluster.start_beat()
        assert_not_public(cluster, worker_url)

        with prometheus(tmp_path / "prometheus", cluster.web.port, worker_port) as prom:
            jobs = run_jobs(cluster, web_dir)
            check_series(prom, (cluster.web.port, worker_port), jobs, web_dir)
            check_socketio_clients(prom, cluster)
            rules = prom.get("/api/v1/rules").json()["data"]["groups"]
            evaluated = [rule for group in rules for rule in group["rules"]]
            assert len(evaluated) >= 7
            assert {rule["health"] for rule in evaluated} == {"ok"}, evaluated
            firing = {rule["name"] for rule in evaluated if rule["state"] != "inactive"}
            assert "ConveyorSweeperStalled" not in firing
            assert "ConveyorMetricsDown" not in firing


def assert_not_public(cluster: Cluster, worker_url: str) -> None:
    assert cluster.web is not None
    for token in (None, "wrong"):
        answer = scrape(cluster.web.url, token)
        assert answer.status_code == 401, answer.text
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert answer.json()["status"] == 401
    # The worker serves once its Celery worker has started.
    wait_until(lambda: _answers(worker_url), 60, "worker metrics", cluster.workdir / "w1.log")
    assert scrape(worker_url, "wrong").status_code == 401
    assert scrape(worker_url, None).status_code == 401
    assert scrape(worker_url, TOKEN).status_code == 200
    assert scrape(cluster.web.url, TOKEN).status_code == 200


def _answers(url: str) -> bool:
    try:
        scrape(url, TOKEN)
    except httpx.HTTPError:
        return False
    return True


def run_jobs(cluster: Cluster, web_dir: Path) -> dict[str, int]:
    """Jobs that succeed until both web processes have created some (each POST is a
    connection of its own, which either gunicorn worker may accept), one that fails at once
    (a 400) and one retried once (a 500)."""
    failed = cluster.submit("[[sim fault=400]] no")
    retried = cluster.submit("[[sim fault=500 times=1]] again")
    succeeded = [cluster.submit("hello") for _ in range(2)]
    while len(created_per_process(web_dir)) < 2 and len(succeeded) < 30:
        succeeded.append(cluster.submit("hello"))
    assert len(created_per_process(web_dir)) >= 2, "one web process took every POST"
    for job_id in [failed, retried, *succeeded]:
        cluster.wait_terminal(job_id, 60)
    assert cluster.db_job(failed)["status"] == "failed"
    assert (cluster.db_job(retried)["status"], cluster.db_job(retried)["attempt"]) == (
        "succeeded",
        2,
    )
    return {"succeeded": len(succeeded) + 1, "failed": 1, "created": len(succeeded) + 2}


def check_series(
    prom: httpx.Client, ports: tuple[int, int], jobs: dict[str, int], web_dir: Path
) -> None:
    ok, created = jobs["succeeded"], jobs["created"]
    web, worker = (f"instance=127.0.0.1:{port}" for port in ports)
    settle(
        prom,
        {
            "max by (job, instance) (up)": {
                f"{web},job=conveyor-web": 1,
                f"{worker},job=conveyor-worker": 1,
            },
            "sum(conveyor_jobs_created_total)": {"": created},
            "sum by (status) (conveyor_jobs_finished_total)": {
                "status=succeeded": ok,
                "status=failed": 1,
            },
            'sum by (status) (conveyor_job_duration_seconds_count{kind="chat"})': {
                "status=succeeded": ok,
                "status=failed": 1,
            },
            # Every attempt's claim: the retried job was claimed twice.
            "sum(conveyor_job_queue_wait_seconds_count)": {"": created + 1},
            "sum by (kind, code) (conveyor_job_retries_total)": {
                "code=model_unavailable,kind=chat": 1
            },
            "sum by (outcome) (conveyor_model_call_duration_seconds_count)": {
                "outcome=ok": ok,
                "outcome=model_bad_request": 1,
                "outcome=model_unavailable": 1,
            },
            'sum(conveyor_model_time_to_first_token_seconds_count{outcome="ok"})': {"": ok},
            'sum(conveyor_events_published_total{type=~"job.queued|job.succeeded"}) by (type)': {
                "type=job.queued": created,
                "type=job.succeeded": ok,
            },
            "max(conveyor_jobs_running)": {"": 0},
            'max(conveyor_jobs_queued{priority="0"})': {"": 0},
            "count(conveyor_jobs_queued)": {"": 10},
            "max(conveyor_pool_gauges_up)": {"": 1},
            "max(conveyor_workers)": {"": 1},
        },
        within=45,
    )
    # Each web process counted only the jobs it created; Prometheus saw their sum.
    assert sum(created_per_process(web_dir).values()) == created
    tokens = query(prom, "sum by (type) (conveyor_model_tokens_total)")
    assert tokens["type=input"] > 0 and tokens["type=output"] > 0
    assert query(prom, 'sum(conveyor_model_cost_usd_total{model="gpt-4o-mini"})')[""] > 0
    assert query(prom, "sum(conveyor_sweeps_total)")[""] >= 1
    since_sweep = query(prom, "time() - max(conveyor_sweeper_last_sweep_timestamp_seconds)")
    assert since_sweep[""] < 30
    # No label carries a job id.
    names = prom.get("/api/v1/label/__name__/values").json()["data"]
    conveyor = [name for name in names if name.startswith("conveyor_")]
    for name in conveyor:
        for series in prom.get("/api/v1/series", params={"match[]": name}).json()["data"]:
            assert not any(len(value) == 36 and value.count("-") == 4 for value in series.values())


def check_socketio_clients(prom: httpx.Client, cluster: Cluster) -> None:
    """A live gauge summed over the web processes: one connection counts once, and not after
    it closes."""
    assert cluster.web is not None
    client = socketio.Client(reconnection=False)
    client.connect(
        cluster.web.url, auth={"api_key": cluster.key}, transports=["websocket"], wait_timeout=10
    )
    try:
        settle(prom, {"sum(conveyor_socketio_clients)": {"": 1}}, within=20)
    finally:
        client.disconnect()
    settle(prom, {"sum(conveyor_socketio_clients)": {"": 0}}, within=20)
