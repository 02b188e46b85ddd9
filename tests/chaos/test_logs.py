"""JSON logs from real processes (gunicorn and a Celery worker, as the Procfile runs them): every
line is JSON, a job's lines carry its id, attempt, kind and tenant, and nothing a user sent or a
model answered is ever in a line (or in the metrics the processes serve), at the most verbose
level, whatever way the job ends."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from devtools.processes import free_port
from tests.chaos.conftest import Cluster, running_cluster

JSON_LOGS = {"CONVEYOR_LOG_FORMAT": "json", "CONVEYOR_LOG_LEVEL": "DEBUG"}
# Metrics on, so that their lines are in the logs too, and their figures are read for the canary.
METRICS_TOKEN = "logs-test-metrics"


def parse_lines(text: str, source: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"a {source} line is not JSON: {line[:300]!r}") from None
    return records


def wait_running(cluster: Cluster, job_id: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while cluster.db_job(job_id)["status"] != "running":
        assert time.monotonic() < deadline, f"job {job_id} never ran"
        time.sleep(0.05)


def test_json_logs_carry_the_job_and_never_what_users_sent(tmp_path: Path) -> None:
    canary = f"canary{uuid.uuid4().hex}"
    web_env = {**JSON_LOGS, "CONVEYOR_METRICS_TOKEN": METRICS_TOKEN}
    metrics_port = free_port()
    with running_cluster(tmp_path, web_env=web_env, ttft=0.05, tps=100) as cluster:
        cluster.start_worker(
            **JSON_LOGS,
            CONVEYOR_METRICS_TOKEN=METRICS_TOKEN,
            CONVEYOR_WORKER_METRICS_PORT=str(metrics_port),
        )
        jobs = {
            "succeeded": cluster.submit(f"{canary} hello"),
            "failed": cluster.submit(f"[[sim fault=400]] {canary}"),
            "retried": cluster.submit(f"[[sim fault=500 times=1]] {canary} again"),
            "canceled": cluster.submit(f"[[sim tokens=400 tps=20]] {canary} slowly"),
        }
        wait_running(cluster, jobs["canceled"])
        with cluster.http() as client:
            assert client.post(f"/jobs/{jobs['canceled']}/cancel").status_code in (200, 202)
        ended = {name: cluster.wait_terminal(job_id, 90)[0] for name, job_id in jobs.items()}
        assert ended["succeeded"]["status"] == "succeeded"
        assert ended["failed"]["status"] == "failed"
        assert (ended["retried"]["status"], ended["retried"]["attempt"]) == ("succeeded", 2)
        assert ended["canceled"]["status"] == "canceled"
        # The answer itself must be in no line either.
        answer = ended["succeeded"]["output"]["text"]
        assert len(answer) > 20
        assert cluster.web is not None
        auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        figures = [
            httpx.get(f"{url}/metrics", headers=auth, timeout=10)
            for url in (cluster.web.url, f"http://127.0.0.1:{metrics_port}")
        ]
        web_text, worker_text = cluster.web.log_text(), cluster.log("w1")

    web_figures, worker_figures = (scraped.text for scraped in figures)
    assert 'conveyor_jobs_created_total{kind="chat",tenant=""} 4.0' in web_figures
    assert "conveyor_jobs_finished_total" in worker_figures
    for scraped in figures:
        assert scraped.status_code == 200
        assert canary not in scraped.text, "the prompt's canary is in the metrics"
        assert answer not in scraped.text, "a model's answer is in the metrics"

    for source, text in (("web", web_text), ("worker", worker_text)):
        assert canary not in text, f"the prompt's canary is in the {source} log"
        assert answer not in text, f"a model's answer is in the {source} log"
        assert "cvk_" not in text, f"an API key is in the {source} log"
    web, worker = parse_lines(web_text, "web"), parse_lines(worker_text, "worker")
    assert any(r["logger"].startswith("gunicorn") for r in web)  # gunicorn's own lines too
    assert any(r["logger"].startswith("celery") for r in worker)  # and Celery's
    for record in web + worker:
        assert {"time", "level", "logger", "message"} <= record.keys()

    for name, job_id in jobs.items():
        mine = [r for r in worker if r.get("job_id") == job_id]
        in_attempt = [r for r in mine if "attempt" in r]
        assert in_attempt, f"no line of the {name} job's attempts"
        for record in in_attempt:
            assert record["kind"] == "chat"
            assert record["tenant"] == "chaos"
            assert record["attempt"] >= 1
    retried = [r for r in worker if r.get("job_id") == jobs["retried"]]
    assert {r["attempt"] for r in retried if "attempt" in r} == {1, 2}
