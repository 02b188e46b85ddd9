"""docker-compose.yml, the production deployment: valid by the Compose specification (`docker
compose config` where the plugin is installed, else the specification's JSON Schema, from Debian's
docker-compose package by `tools/require compose-schema`), and what an operator relies on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.migrate import ROOT
from app.queue import QUEUE, WEBHOOK_QUEUE

COMPOSE = ROOT / "docker-compose.yml"
SCHEMAS = (
    ROOT / ".venv/share/compose-spec/compose_spec.json",
    Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json"),
)
SECRETS = {
    "CONVEYOR_SECRET_KEY": "s" * 32,
    "POSTGRES_PASSWORD": "pg-secret",
    "REDIS_PASSWORD": "redis-secret",
    "FLOWER_BASIC_AUTH": "admin:flower-secret",
    "CONVEYOR_METRICS_TOKEN": "metrics-secret",
    "PROMETHEUS_USER": "admin",
    "PROMETHEUS_PASSWORD_HASH": "$2y$10$abcdefghijklmnopqrstuv",
}
CONVEYOR_SERVICES = ("web", "worker", "webhooks", "beat", "flower")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    found = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return found.returncode == 0


def test_the_file_is_valid_by_the_compose_specification(compose: dict[str, Any]) -> None:
    if compose_plugin():
        checked = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
            env={**os.environ, **SECRETS},
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        return
    schema_file = next((path for path in SCHEMAS if path.is_file()), None)
    assert schema_file is not None, "run tools/require compose-schema (make test does)"
    schema = json.loads(schema_file.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_a_broken_file_fails_the_schema() -> None:
    """The check above can fail: the schema refuses what Compose refuses."""
    schema_file = next((path for path in SCHEMAS if path.is_file()), None)
    if schema_file is None:
        pytest.skip("the schema is checked by `docker compose config` here")
    schema = json.loads(schema_file.read_text())
    broken = {"services": {"web": {"image": "x", "healthcheck": {"interval": 5, "tset": []}}}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_every_process_is_health_checked_and_waits_for_the_migration(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    for name in CONVEYOR_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["postgres"] == depends["redis"] == {"condition": "service_healthy"}
    assert services["migrate"]["command"] == ["python", "-m", "app.migrate"]


def test_secrets_come_from_the_environment_and_nothing_runs_open(
    compose: dict[str, Any],
) -> None:
    text = COMPOSE.read_text()
    for secret in ("CONVEYOR_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert f"${{{secret}:?" in text, f"{secret} is not required from the environment"
    services = compose["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    assert "--requirepass" in " ".join(services["redis"]["command"])
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:5555:5555"]  # loopback by default
    assert services["web"]["environment"]["CONVEYOR_LOG_FORMAT"] == "json"


def test_workers_scale_and_consume_the_queues_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("worker", "webhooks"):
        service = services[name]
        # `--scale worker=N` needs no fixed name and no published port.
        assert "container_name" not in service and "ports" not in service
        command = service["command"]
        assert command[command.index("-Q") + 1] in (QUEUE, WEBHOOK_QUEUE)
        # The healthcheck pings this container's own node, by the name the command gives it.
        node = command[command.index("-n") + 1].split("@")[0]
        assert f"-d {node}@$$HOSTNAME" in service["healthcheck"]["test"][1]


def test_prometheus_asks_for_auth_and_scrapes_web_and_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    command = " ".join(prometheus["command"])
    # Basic auth from the environment, through Prometheus' web config file.
    assert "--web.config.file=/tmp/conveyor/web.yml" in command
    assert "basic_auth_users" in command
    for name in ("PROMETHEUS_USER", "PROMETHEUS_PASSWORD_HASH", "CONVEYOR_METRICS_TOKEN"):
        assert prometheus["environment"][name].startswith(f"${{{name}:?")
    assert prometheus["ports"] == ["${PROMETHEUS_BIND:-127.0.0.1}:9090:9090"]
    # The token it sends is the one every Conveyor process requires.
    assert services["web"]["environment"]["CONVEYOR_METRICS_TOKEN"].startswith(
        "${CONVEYOR_METRICS_TOKEN:?"
    )
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    scraped = {}
    for job in config["scrape_configs"]:
        assert job["authorization"]["credentials_file"] == "/tmp/conveyor/metrics-token"
        for found in job["dns_sd_configs"]:
            scraped.update(dict.fromkeys(found["names"], found["port"]))
    assert scraped["web"] == 8000
    for name in ("worker", "webhooks"):
        environment = services[name]["environment"]
        assert scraped[name] == int(environment["CONVEYOR_WORKER_METRICS_PORT"])
        assert environment["CONVEYOR_WORKER_METRICS_HOST"] == "0.0.0.0"
        assert "ports" not in services[name]  # on the compose network only
