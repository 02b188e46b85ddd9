"""The metrics' recording helpers, a worker's /metrics server, and the shipped Prometheus
config, alert rules and Grafana dashboard (checked by Prometheus' own promtool where it is
installed: `tools/require prometheus`, as `make test` runs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

from app import metrics
from app.api.metrics import PoolFigures, _pool_families
from app.jobs.presence import SweepRecord
from app.migrate import ROOT

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus/alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus/prometheus.yml"
DASHBOARD = DEPLOY / "grafana/conveyor-dashboard.json"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def tenant_label() -> Iterator[None]:
    metrics.configure(tenant_label=True)
    yield
    metrics.configure(tenant_label=False)


def test_a_finished_job_counts_by_kind_and_status_with_its_duration() -> None:
    labels = {"kind": "unit-kind", "status": "failed"}
    before = value("conveyor_job_duration_seconds_count", **labels)
    finished = value("conveyor_jobs_finished_total", **labels, tenant="")
    ended = datetime.now(UTC)
    metrics.job_finished("unit-kind", "failed", "acme", ended - timedelta(seconds=3), ended)
    # A job canceled before it ever started counts as finished, with no duration.
    metrics.job_finished("unit-kind", "failed", "acme", None, ended)
    assert value("conveyor_jobs_finished_total", **labels, tenant="") == finished + 2
    assert value("conveyor_job_duration_seconds_count", **labels) == before + 1
    assert value("conveyor_job_duration_seconds_bucket", **labels, le="2.5") == 0
    assert value("conveyor_job_duration_seconds_bucket", **labels, le="5.0") == before + 1


def test_the_tenant_is_a_label_only_when_configured(tenant_label: None) -> None:
    metrics.job_created("unit-tenant", "acme")
    assert value("conveyor_jobs_created_total", kind="unit-tenant", tenant="acme") == 1
    metrics.configure(tenant_label=False)
    metrics.job_created("unit-tenant", "acme")
    assert value("conveyor_jobs_created_total", kind="unit-tenant", tenant="") == 1
    assert value("conveyor_jobs_created_total", kind="unit-tenant", tenant="acme") == 1


def test_a_model_call_records_latency_first_token_tokens_and_cost() -> None:
    row = {
        "model": "unit-model",
        "outcome": "ok",
        "latency_ms": 1500.0,
        "ttft_ms": 80.0,
        "tokens_in": 12,
        "tokens_out": 30,
        "cost_usd": Decimal("0.0025"),
    }
    metrics.model_call(row, "acme")
    metrics.model_call(row | {"outcome": "model_unavailable", "ttft_ms": None}, "acme")
    model = {"model": "unit-model"}
    assert value("conveyor_model_call_duration_seconds_count", **model, outcome="ok") == 1
    assert value("conveyor_model_call_duration_seconds_sum", **model, outcome="ok") == 1.5
    assert value("conveyor_model_time_to_first_token_seconds_sum", **model, outcome="ok") == 0.08
    assert value("conveyor_model_time_to_first_token_seconds_count", **model, outcome="ok") == 1
    unavailable = {"outcome": "model_unavailable"}
    assert value("conveyor_model_time_to_first_token_seconds_count", **model, **unavailable) == 0
    assert value("conveyor_model_tokens_total", **model, type="output", tenant="") == 60
    assert value("conveyor_model_cost_usd_total", **model, tenant="") == pytest.approx(0.005)


def test_socketio_clients_is_a_live_sum_across_processes() -> None:
    assert metrics.SOCKETIO_CLIENTS._multiprocess_mode == "livesum"


@pytest.fixture
def worker_server() -> Iterator[str]:
    server = metrics.serve_worker_metrics("127.0.0.1", 0, "s3cret")
    assert server is not None
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def test_a_worker_serves_its_metrics_to_the_token_only(worker_server: str) -> None:
    metrics.job_retried("unit-kind", "model_rate_limited")
    refused = httpx.get(worker_server, headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert httpx.get(worker_server).status_code == 401
    assert not metrics.token_matches("Bearer s3cr\u00e9t", "s3cret")  # not ASCII: no error
    assert not metrics.token_matches("Basic s3cret", "s3cret")
    assert metrics.token_matches("bearer  s3cret ", "s3cret")
    answer = httpx.get(worker_server, headers={"Authorization": "Bearer s3cret"})
    assert answer.status_code == 200
    line = 'conveyor_job_retries_total{code="model_rate_limited",kind="unit-kind"}'
    assert line in answer.text


def test_a_worker_without_a_token_serves_loopback_only() -> None:
    assert metrics.serve_worker_metrics("0.0.0.0", 0, None) is None


def test_the_pool_gauges_have_every_priority_and_the_last_sweep() -> None:
    now = time.time()
    sweep = SweepRecord(at=now - 4, interval=15, republished=0, recovered=0, failed=0, canceled=0)
    families = {
        family.name: family for family in _pool_families(PoolFigures({3: 7}, 2, [], sweep), now)
    }
    queued = {s.labels["priority"]: s.value for s in families["conveyor_jobs_queued"].samples}
    assert queued == {str(p): (7 if p == 3 else 0) for p in range(10)}
    assert families["conveyor_jobs_running"].samples[0].value == 2
    assert families["conveyor_sweeper_last_sweep_timestamp_seconds"].samples[0].value == now - 4
    no_sweep = {f.name for f in _pool_families(PoolFigures({}, 0, [], None), now)}
    assert "conveyor_sweeper_last_sweep_timestamp_seconds" not in no_sweep


# The shipped deploy/ files ----------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every series name Conveyor exports: the metrics of app/metrics.py with their suffixes,
    and the pool's gauges."""
    names = set()
    for family in REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
    for collector in vars(metrics).values():
        if isinstance(collector, metrics.Histogram):
            base = collector._name
            names.update(f"{base}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        elif isinstance(collector, metrics.Counter):
            names.add(f"{collector._name}_total")
        elif isinstance(collector, metrics.Gauge):
            names.add(collector._name)
    sweep = SweepRecord(at=0, interval=1, republished=0, recovered=0, failed=0, canceled=0)
    figures = PoolFigures({}, 0, [], sweep)
    names.update(family.name for family in _pool_families(figures, 0))
    names.add("conveyor_pool_gauges_up")
    return {name for name in names if name.startswith("conveyor_")}


def referenced(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\bconveyor_\w+", expr)}


def test_the_dashboard_and_the_rules_use_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs_of_rules = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    known = exported_names()
    assert {"conveyor_jobs_finished_total", "conveyor_jobs_queued"} <= known
    assert referenced(exprs) - known == set()
    assert referenced(exprs_of_rules) - known == set()
    # What the issue asks the alerts to cover.
    alerted = referenced(exprs_of_rules)
    for name in (
        "conveyor_job_queue_wait_seconds_bucket",
        "conveyor_jobs_finished_total",
        "conveyor_lease_recoveries_total",
        "conveyor_sweeper_last_sweep_timestamp_seconds",
    ):
        assert name in alerted
    assert referenced(["conveyor_no_such_metric"]) - known  # the check can fail


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "no promtool: run tools/require prometheus (make test does)"
        print(message)
        pytest.skip(message)
    return found


def test_promtool_accepts_the_alert_rules() -> None:
    checked = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """As shipped, but for the token file, which the compose service writes at start."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    token = tmp_path / "metrics-token"
    token.write_text("token")
    for job in config["scrape_configs"]:
        assert job["authorization"]["credentials_file"] == "/tmp/conveyor/metrics-token"
        job["authorization"]["credentials_file"] = str(token)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({**config, "scrape_configs": [{"job_name": "x", "scrape_interval": "soon"}]})
    )
    refused = subprocess.run(
        [promtool(), "check", "config", str(broken)], capture_output=True, check=False
    )
    assert refused.returncode != 0


def test_the_compose_service_writes_a_web_config_promtool_accepts(tmp_path: Path) -> None:
    """Prometheus' basic auth in docker-compose.yml: its start command, run by a shell with the
    environment Compose gives it, writes the token file and a web config with the user."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["prometheus"]["command"][0]
    # As Compose hands it over ($$ is a literal $), into a directory of this test's own, and
    # stopping before Prometheus would start.
    command = command.replace("$$", "$").replace("/tmp/conveyor", str(tmp_path / "run"))
    command = command[: command.index("exec /bin/prometheus")] + "true"
    password_hash = "$2y$10$3hK6GXbR0bG3wTj5Qm7pXe5o7fZrKqg6rQ1F0w1tQx3w4Z9o9n8eK"
    environment = {
        "CONVEYOR_METRICS_TOKEN": "the-token",
        "PROMETHEUS_USER": "admin",
        "PROMETHEUS_PASSWORD_HASH": password_hash,
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(["sh", "-c", command], env=environment, check=True)
    assert (tmp_path / "run/metrics-token").read_text() == "the-token"
    web_config = tmp_path / "run/web.yml"
    assert yaml.safe_load(web_config.read_text()) == {"basic_auth_users": {"admin": password_hash}}
    checked = subprocess.run(
        [promtool(), "check", "web-config", str(web_config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
