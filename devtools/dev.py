"""`make dev`: everything Conveyor needs, on a fresh machine, in one command.

PostgreSQL and Redis are the ones in DATABASE_URL / REDIS_URL when set, else private servers
with their data under .conveyor/ (kept between runs); then migrations, a demo API key, the
model simulator unless a real endpoint is configured, the Procfile's processes under honcho,
and one demo job followed live. Ctrl-C stops everything this command started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.cli.client import Api, console, follow_job, wait_for_api
from app.keys.api_keys import hash_key
from app.migrate import ROOT, upgrade
from devtools.postgres import PostgresServer
from devtools.processes import free_port
from devtools.redis_server import RedisServer
from devtools.simprocess import SimulatorProcess

STATE = ROOT / ".conveyor"
PROCESSES = ("web", "worker", "webhooks", "beat", "flower")
DEMO_PROMPT = "Write a short welcome note for someone trying Conveyor for the first time."


def port_or_free(preferred: int) -> int:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    return free_port()


def persistent_secret(name: str) -> str:
    path = STATE / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def demo_key(database_url: str, web_env: dict[str, str]) -> str:
    """The demo tenant's key, created once and kept in .conveyor/demo-key."""
    path = STATE / "demo-key"
    if path.exists() and key_exists(database_url, path.read_text().strip()):
        return path.read_text().strip()
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "app:create_app()",
            "keys",
            "create",
            "--owner",
            "demo",
            "--name",
            "make dev",
        ],
        env=web_env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    key = output.strip().splitlines()[-1]
    path.write_text(key)
    path.chmod(0o600)
    return key


def key_exists(database_url: str, key: str) -> bool:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                text("SELECT 1 FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL"),
                {"h": hash_key(key)},
            ).first()
    finally:
        engine.dispose()
    return found is not None


@contextlib.contextmanager
def services(env: dict[str, str]) -> Iterator[None]:
    """Starts what is not configured, and stops it afterwards (in reverse order)."""
    with contextlib.ExitStack() as stack:
        if "DATABASE_URL" not in os.environ:
            console.print("[bold]starting[/bold] PostgreSQL (data in .conveyor/postgres)")
            pg = stack.enter_context(PostgresServer(STATE / "postgres", port_or_free(54329)))
            env["DATABASE_URL"] = pg.url
        if "REDIS_URL" not in os.environ:
            console.print("[bold]starting[/bold] Redis (data in .conveyor/redis)")
            rs = stack.enter_context(RedisServer(STATE / "redis", port_or_free(63790)))
            env["REDIS_URL"] = rs.url
        if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
            console.print("[bold]starting[/bold] the model simulator (no OPENAI_API_KEY set)")
            sim = stack.enter_context(SimulatorProcess(ttft=0.4, tps=30))
            env["OPENAI_BASE_URL"] = sim.base_url
            env["OPENAI_API_KEY"] = "simulator"
            # The simulator also speaks ComfyUI's API, at its root.
            env.setdefault("CONVEYOR_COMFYUI_URL", sim.base_url.removesuffix("/v1"))
        yield


def main() -> int:
    STATE.mkdir(exist_ok=True)
    env = dict(os.environ)
    web_port, flower_port = port_or_free(8000), port_or_free(5555)
    metrics_ports = {"WORKER_METRICS_PORT": port_or_free(9101)}
    metrics_ports["WEBHOOKS_METRICS_PORT"] = port_or_free(9102)
    env.update(
        {
            "PORT": str(web_port),
            "FLOWER_PORT": str(flower_port),
            "CONVEYOR_SECRET_KEY": env.get("CONVEYOR_SECRET_KEY") or persistent_secret("secret"),
            "FLOWER_BASIC_AUTH": env.get("FLOWER_BASIC_AUTH")
            or f"conveyor:{persistent_secret('flower-password')}",
            # /metrics of the web and of both workers (the Procfile passes their ports).
            "CONVEYOR_METRICS_TOKEN": env.get("CONVEYOR_METRICS_TOKEN")
            or persistent_secret("metrics-token"),
            **{name: str(port) for name, port in metrics_ports.items()},
            "CONVEYOR_BEAT_SCHEDULE": str(STATE / "celerybeat-schedule"),
            "CONVEYOR_ARTIFACT_DIR": env.get("CONVEYOR_ARTIFACT_DIR") or str(STATE / "artifacts"),
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    log_path = STATE / "processes.log"
    try:
        with services(env):
            console.print("[bold]migrating[/bold] the database")
            upgrade(env["DATABASE_URL"])
            key = demo_key(env["DATABASE_URL"], env)
            with log_path.open("w") as log:
                honcho = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "honcho",
                        "-f",
                        str(ROOT / "Procfile"),
                        "start",
                        *PROCESSES,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                try:
                    return run_demo_then_wait(honcho, env, key, web_port, flower_port, log_path)
                finally:
                    stop(honcho)
    except KeyboardInterrupt:
        console.print("\n[bold]stopped[/bold]")
        return 0


def run_demo_then_wait(
    honcho: subprocess.Popen[bytes],
    env: dict[str, str],
    key: str,
    web_port: int,
    flower_port: int,
    log_path: Path,
) -> int:
    url = f"http://127.0.0.1:{web_port}"
    worker_ports = f"{env['WORKER_METRICS_PORT']} and {env['WEBHOOKS_METRICS_PORT']}"
    console.print(f"[bold]starting[/bold] {', '.join(PROCESSES)} (logs: {log_path})")
    wait_for_api(url, timeout=90)
    console.print(f"\n[bold]demo job[/bold] chat: {DEMO_PROMPT!r}\n")
    api = Api(url, key)
    job = api.request("POST", "/jobs", json={"kind": "chat", "input": {"prompt": DEMO_PROMPT}})
    follow_job(api, job["id"])
    console.print(
        f"""
[bold]Conveyor is running.[/bold] Ctrl-C stops everything.
  dashboard   {url}/
  API docs    {url}/api/v1/docs   (OpenAPI: {url}/api/v1/openapi.json)
  Flower      http://127.0.0.1:{flower_port}/   (basic auth: {env["FLOWER_BASIC_AUTH"]})
  metrics     curl -H 'Authorization: Bearer {env["CONVEYOR_METRICS_TOKEN"]}' {url}/metrics
  (workers)   the same, at 127.0.0.1 ports {worker_ports} (docs/metrics.md)
  demo key    export CONVEYOR_URL={url} CONVEYOR_API_KEY={key}
  try         conveyor submit chat --prompt "Hello" --follow
  databases   DATABASE_URL={env["DATABASE_URL"]}  REDIS_URL={env["REDIS_URL"]}
  logs        {log_path}
""",
        soft_wrap=True,
    )
    with log_path.open() as log:
        log.seek(0, os.SEEK_END)
        while honcho.poll() is None:
            line = log.readline()
            if line:
                sys.stdout.write(line)
            else:
                time.sleep(0.2)
    if honcho.returncode in (0, 130, -signal.SIGINT):  # Ctrl-C reached honcho first
        console.print("\n[bold]stopped[/bold]")
        return 0
    console.print(f"[red]the processes stopped (exit {honcho.returncode}); see {log_path}[/red]")
    return honcho.returncode or 1


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except httpx.HTTPError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)
