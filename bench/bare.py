"""The bare peer of `bench.cpu`: the least a Celery task can do for one streamed chat job.

It takes a row id and the prompt from the message, streams the answer from the same
simulator over one reused HTTP client, parses the SSE lines itself, and writes the text with
one UPDATE on a pooled connection. No job row to claim, no lease, no events, no retries: what
Conveyor does beyond this is its bookkeeping, and `bench.cpu` prices it.

    celery -A bench.bare worker --pool gevent --concurrency 50 -Q bare

`bare.started` is the peer of `bench.latency`: it only notes when its body starts.
"""

from __future__ import annotations

import json
import os
import queue
import time
from typing import Any

import httpx
import psycopg
from celery import Celery

QUEUE = "bare"
TABLE = "bare_results"

app = Celery("bare", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False)

_http: httpx.Client | None = None
_connections: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()


def _client() -> httpx.Client:
    global _http  # noqa: PLW0603 - one client per worker process, made at first use
    if _http is None:
        _http = httpx.Client(
            base_url=os.environ["OPENAI_BASE_URL"],
            headers={"Authorization": "Bearer sim"},
            timeout=60,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
    return _http


def _write(row_id: int, text: str) -> None:
    try:
        conn = _connections.get_nowait()
    except queue.Empty:
        conn = psycopg.connect(os.environ["BARE_CONNINFO"], autocommit=True)
    try:
        conn.execute(f"UPDATE {TABLE} SET text = %s, done = true WHERE id = %s", (text, row_id))
    finally:
        _connections.put(conn)


@app.task(name="bare.chat")
def chat(row_id: int, prompt: str, model: str) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    with _client().stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            for choice in json.loads(payload).get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
    _write(row_id, "".join(parts))


# The dispatch-latency peer of `bench.latency` ------------------------------------------------

STARTED_KEY = "bench:bare:started"
_redis: Any = None


def _started_log() -> Any:
    global _redis  # noqa: PLW0603 - one client per worker process, made at first use
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _redis


@app.task(name="bare.started")
def started(number: int, sent_at: float, hold: float) -> None:
    """Notes the moment its body starts (the first thing it does), then holds its slot for
    `hold` seconds, about as long as the Conveyor job it is compared with."""
    started_at = time.time()
    _started_log().rpush(STARTED_KEY, json.dumps([number, sent_at, started_at]))
    if hold > 0:
        time.sleep(hold)  # a green sleep under the gevent pool, as the model call's wait is
