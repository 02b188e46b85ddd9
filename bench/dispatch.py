"""`POST /api/v1/jobs` throughput and latency under gunicorn (the Procfile's web line), against
peers measured in the same run on the same private PostgreSQL and Redis:

  live    peer (a): GET /api/v1/live, same server and settings (HTTP + Flask floor)
  post    POST /api/v1/jobs {"kind":"chat","input":{"prompt":"hello"}} with a Bearer key
          (per-key rate limits on, set high enough never to refuse: their cost is measured)
  postoff peer (d): the same POST to a second gunicorn with rate limits off
          (target: post >= 0.9x postoff)
  raw1    peer (b): INSERT jobs + INSERT job_events in one transaction, then
          send_task("conveyor.run_job") with the app's Celery config; no HTTP; one thread
  rawN    the same in --raw-procs processes x --raw-threads threads (default 2 x 16, the
          server's processes)
  svc1    (c, optional) Jobs.create_job() in-process, one thread, no HTTP: what
          the service layer costs without gunicorn, Flask and the view
  batch   POST /api/v1/batches with --batch-size of the same job each, over
          --batch-concurrency connections; counted in jobs, not requests, so its
          ops/s compares with POST /jobs' (target: at least 3x)

Each phase: --warmup seconds, then --duration seconds measured, with --concurrency
connections held busy by an aiohttp client (one event loop in its own process; its CPU is
reported). Phases interleave within each of --runs runs (post and postoff swap places on
every second run, so neither server is always measured second); medians are printed. No
Celery worker runs: tasks pile up in Redis and are deleted, with the jobs, before every
phase. A final POST phase runs under py-spy to show where a POST's time goes.

    python -m bench.dispatch                    # about 2.5 minutes
    python -m bench.dispatch --runs 1 --duration 5 --profile-seconds 0
    python -m bench.dispatch --phases live,post,svc1 --variants no-sent-event,core-insert
    python -m bench.dispatch --workers 4 --threads 4 --phases live,post

--variants applies what-if patches (bench/variants.py) inside the server and the svc1 phase;
--env KEY=VALUE adds server environment (e.g. CONVEYOR_DB_POOL_SIZE=20).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import variants
from bench.common import (
    BIN,
    RESULTS,
    UNREACHED_LIMITS,
    Child,
    CpuMeter,
    Profile,
    Rule,
    Services,
    answers_live,
    create_key,
    descendants,
    have_pyspy,
    median,
    percentile,
    print_table,
    private_services,
    read_counters,
    run_main,
    sleep_until,
    start_pyspy,
    stop_on_sigterm,
    wait_until,
)

PHASES = ("live", "post", "postoff", "raw1", "rawN", "svc1", "batch")
DEFAULT_PHASES = ("live", "post", "postoff", "raw1", "rawN", "batch")
# Served by gunicorn (their CPU per op is gunicorn's); the others run in the load processes.
HTTP_PHASES = ("live", "post", "postoff", "batch")
POST_BODY = {"kind": "chat", "input": {"prompt": "hello"}}
OWNER = "bench"
TARGETS = {"live": 0.5, "rawN": 0.8, "postoff": 0.9}
NO_LIMITS = {"CONVEYOR_RATE_LIMITS_ENABLED": "false"}
# Jobs per second through batches over jobs per second through single POSTs.
BATCH_TARGET = 3.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dispatch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="HTTP connections")
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured s per phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help="comma-separated, from " + ",".join(PHASES),
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (Procfile: 2)")
    parser.add_argument(
        "--worker-class", default="gevent", help="gunicorn worker class (Procfile: gevent)"
    )
    parser.add_argument(
        "--threads", type=int, default=16, help="gunicorn threads, with --worker-class gthread"
    )
    parser.add_argument(
        "--worker-connections", type=int, default=1000, help="with gevent (Procfile: 1000)"
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="jobs per POST /batches")
    parser.add_argument(
        "--batch-concurrency", type=int, default=4, help="HTTP connections of the batch phase"
    )
    parser.add_argument("--raw-procs", type=int, default=2, help="processes of the rawN peer")
    parser.add_argument("--raw-threads", type=int, default=16, help="threads per rawN process")
    parser.add_argument(
        "--raw-without-event",
        action="store_true",
        help="raw peers insert only the jobs row (autocommit), not its job_events row",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=8.0, help="py-spy the POST phase (0: off)"
    )
    parser.add_argument("--profile-dir", type=Path, default=RESULTS, help="collapsed stacks")
    parser.add_argument(
        "--variants", default="", help="what-if patches for the server, see bench/variants.py"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server env"
    )
    args = parser.parse_args()
    args.variants = variants.parse(args.variants)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    return args


# The HTTP load generator (runs in a child process) -----------------------------------------


@dataclass
class LoadResult:
    """What one load process measured. Latencies and statuses cover the measured window only;
    `bad` counts every unexpected status or error, warm-up included."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)
    cpu_seconds: float = 0.0


@dataclass(frozen=True)
class Window:
    start_at: float  # wall clock: load starts (warm-up)
    measure_from: float
    until: float


def http_phase(request: dict[str, Any], concurrency: int, window: Window) -> LoadResult:
    return asyncio.run(_http_phase(request, concurrency, window))


async def _http_phase(request: dict[str, Any], concurrency: int, window: Window) -> LoadResult:
    import aiohttp

    result = LoadResult()
    # One connection per worker task, kept alive: the server sees exactly `concurrency`.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _async_sleep_until(window.start_at)
        loops = [_http_loop(session, request, window, result) for _ in range(concurrency)]
        await asyncio.gather(_measure_cpu(window, result), *loops)
    return result


async def _http_loop(
    session: Any, request: dict[str, Any], window: Window, result: LoadResult
) -> None:
    expected = request["expect"]
    while time.time() < window.until:
        began = time.perf_counter()
        try:
            async with session.request(
                request["method"], request["url"], data=request["body"], headers=request["headers"]
            ) as response:
                await response.read()
                status = response.status
        except Exception as exc:  # the run reports errors, it must not die of one
            result.bad[type(exc).__name__] += 1
            await asyncio.sleep(0.01)
            continue
        latency = time.perf_counter() - began
        if status != expected:
            result.bad[str(status)] += 1
        # Counted by completion time, so the throughput over the window is unbiased.
        if window.measure_from <= time.time() <= window.until:
            result.latencies.append(latency)
            result.statuses[status] += 1


async def _measure_cpu(window: Window, result: LoadResult) -> None:
    await _async_sleep_until(window.measure_from)
    before = time.process_time()
    await _async_sleep_until(window.until)
    result.cpu_seconds = time.process_time() - before


async def _async_sleep_until(wall_time: float) -> None:
    await asyncio.sleep(max(0.0, wall_time - time.time()))


# The raw peer (runs in child processes) ------------------------------------------------------

INSERT_JOB = """
INSERT INTO jobs (id, owner, kind, status, input, priority, max_attempts, idempotency_key,
                  request_hash, model, retry_of, last_seq, created_at, updated_at, dispatched_at)
VALUES (%s, %s, 'chat', 'queued', %s, 0, 3, NULL, NULL, 'gpt-4o-mini', NULL, 1, %s, %s, %s)
"""
INSERT_EVENT = """
INSERT INTO job_events (job_id, seq, type, at, data) VALUES (%s, 1, 'job.queued', %s, %s)
"""


def raw_phase(
    conninfo: str, celery_conf: dict[str, Any], threads: int, with_event: bool, window: Window
) -> LoadResult:
    """INSERT + send_task in `threads` threads of this process, each on its own connection."""
    from celery import Celery

    celery = Celery("bench-raw", set_as_current=False)
    celery.conf.update(celery_conf)
    results = [LoadResult() for _ in range(threads)]
    workers = [
        threading.Thread(target=_raw_loop, args=(conninfo, celery, with_event, window, r))
        for r in results
    ]
    for worker in workers:
        worker.start()
    sleep_until(window.measure_from)
    before = time.process_time()
    sleep_until(window.until)
    cpu = time.process_time() - before
    for worker in workers:
        worker.join()
    merged = LoadResult(cpu_seconds=cpu)
    for r in results:
        merged.latencies += r.latencies
        merged.statuses.update(r.statuses)
        merged.bad.update(r.bad)
    return merged


def _raw_loop(
    conninfo: str, celery: Any, with_event: bool, window: Window, result: LoadResult
) -> None:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        sleep_until(window.start_at)
        while time.time() < window.until:
            began = time.perf_counter()
            try:
                _raw_dispatch_one(conn, celery, with_event)
            except Exception as exc:
                result.bad[type(exc).__name__] += 1
                continue
            if window.measure_from <= time.time() <= window.until:
                result.latencies.append(time.perf_counter() - began)
                result.statuses[0] += 1


def insert_job(conn: Any, with_event: bool = True) -> uuid.UUID:
    """The raw peer's durable work for one job: its row (and its job.queued event, in the same
    transaction), on an autocommit psycopg connection."""
    from psycopg.types.json import Jsonb

    job_id, now = uuid.uuid4(), datetime.now(UTC)
    job_args = (job_id, OWNER, Jsonb(POST_BODY["input"]), now, now, now)
    if with_event:
        with conn.transaction():
            conn.execute(INSERT_JOB, job_args)
            conn.execute(INSERT_EVENT, (job_id, now, Jsonb({"kind": "chat", "retry_of": None})))
    else:
        conn.execute(INSERT_JOB, job_args)
    return job_id


def _raw_dispatch_one(conn: Any, celery: Any, with_event: bool) -> None:
    job_id = insert_job(conn, with_event)
    # Exactly what Jobs.dispatch publishes for a priority-0 job.
    celery.send_task("conveyor.run_job", args=[str(job_id)], countdown=None, priority=9)


def service_phase(
    settings_values: dict[str, Any], patches: list[str], window: Window
) -> LoadResult:
    """runtime().jobs.create_job() in a loop inside an app context: the POST minus HTTP and view."""
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    variants.apply(patches)
    from app import create_app
    from app.config import Settings
    from app.runtime import runtime

    app = create_app(Settings(**settings_values))
    result = LoadResult()
    with app.app_context():
        sleep_until(window.start_at)
        cpu_before = None
        while (now := time.time()) < window.until:
            if cpu_before is None and now >= window.measure_from:
                cpu_before = time.process_time()
            began = time.perf_counter()
            runtime().jobs.create_job(owner=OWNER, kind="chat", input=POST_BODY["input"])
            if window.measure_from <= time.time() <= window.until:
                result.latencies.append(time.perf_counter() - began)
                result.statuses[0] += 1
        result.cpu_seconds = time.process_time() - (cpu_before or time.process_time())
    app.extensions["conveyor"].db.dispose()
    return result


def _prepare_worker() -> int:
    """Imports what the phases need, so the first measured phase pays no import cost."""
    import aiohttp  # noqa: F401
    import celery  # noqa: F401
    import psycopg  # noqa: F401

    time.sleep(1.0)  # keeps this worker busy so the next call lands on another process
    return os.getpid()


# Orchestration --------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    services: Services
    server: Child
    url: str
    key: str
    # The peer server without rate limits (the postoff phase), when that phase runs.
    url_off: str | None
    pool: ProcessPoolExecutor
    meter: CpuMeter
    celery_conf: dict[str, Any]


@dataclass
class PhaseResult:
    phase: str
    rps: float
    p50_ms: float
    p99_ms: float
    bad: Counter[str]
    cpu: dict[str, float]  # percent of one core per process tree; machine: % of all cores
    redis_per_op: float = float("nan")
    pg_xacts_per_op: float = float("nan")


def start_server(
    services: Services, args: argparse.Namespace, limits: dict[str, str]
) -> tuple[Child, str]:
    from devtools.processes import free_port

    port = free_port()
    cmd = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}"]
    cmd += ["--worker-class", args.worker_class, "--workers", str(args.workers)]
    if args.worker_class == "gthread":
        cmd += ["--threads", str(args.threads)]
    else:
        cmd += ["--worker-connections", str(args.worker_connections)]
    # Exactly the Procfile's target, unless what-if patches must be applied first.
    target = "bench.variants:web_app()" if args.variants else "app:create_app()"
    cmd += ["--graceful-timeout", "20", target]
    env = services.env(OPENAI_API_KEY="x", **{variants.ENV: ",".join(args.variants)})
    env.update(limits)
    env.update(kv.split("=", 1) for kv in args.env)
    server = Child("gunicorn", cmd, env, services.workdir).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_live(url, server), 60, "gunicorn answering /api/v1/live")
        # Every worker must have booted, or the first phase measures one of them.
        wait_until(lambda: len(descendants(server.pid)) >= args.workers, 30, "gunicorn workers")
    except TimeoutError:
        print(server.log_tail())
        raise
    return server, url


def http_request(bench: Bench, phase: str) -> dict[str, Any]:
    if phase == "live":
        return {
            "method": "GET",
            "url": f"{bench.url}/api/v1/live",
            "headers": {},
            "body": None,
            "expect": 200,
        }
    headers = {"Authorization": f"Bearer {bench.key}", "Content-Type": "application/json"}
    if phase == "batch":
        return {
            "method": "POST",
            "url": f"{bench.url}/api/v1/batches",
            "headers": headers,
            "body": json.dumps({"items": [POST_BODY] * bench.args.batch_size}).encode(),
            "expect": 202,
        }
    base = bench.url_off if phase == "postoff" else bench.url
    return {
        "method": "POST",
        "url": f"{base}/api/v1/jobs",
        "headers": headers,
        "body": json.dumps(POST_BODY).encode(),
        "expect": 202,
    }


def submit_phase(bench: Bench, phase: str, window: Window) -> list[Future[LoadResult]]:
    args = bench.args
    if phase in HTTP_PHASES:
        request = http_request(bench, phase)
        concurrency = args.batch_concurrency if phase == "batch" else args.concurrency
        return [bench.pool.submit(http_phase, request, concurrency, window)]
    if phase == "svc1":
        values = {"database_url": bench.services.pg.url, "redis_url": bench.services.redis.url}
        return [bench.pool.submit(service_phase, values, args.variants, window)]
    conninfo = bench.services.pg.conninfo()
    with_event = not args.raw_without_event
    procs, threads = (1, 1) if phase == "raw1" else (args.raw_procs, args.raw_threads)
    return [
        bench.pool.submit(raw_phase, conninfo, bench.celery_conf, threads, with_event, window)
        for _ in range(procs)
    ]


def run_phase(bench: Bench, phase: str, warmup: float, duration: float) -> PhaseResult:
    bench.services.reset()
    start_at = time.time() + 0.3
    window = Window(start_at, start_at + warmup, start_at + warmup + duration)
    futures = submit_phase(bench, phase, window)
    sleep_until(window.measure_from)
    before, counters_before = bench.meter.snapshot(), read_counters(bench.services)
    sleep_until(window.until)
    after, counters_after = bench.meter.snapshot(), read_counters(bench.services)
    results = [f.result(timeout=warmup + duration + 60) for f in futures]
    jobs_per_request = bench.args.batch_size if phase == "batch" else 1
    result = summarize(phase, results, bench.meter.usage(before, after), duration, jobs_per_request)
    ops = max(1.0, result.rps * duration)
    result.redis_per_op = (counters_after.redis_total() - counters_before.redis_total()) / ops
    result.pg_xacts_per_op = (counters_after.pg_xacts - counters_before.pg_xacts) / ops
    return result


def summarize(
    phase: str,
    results: list[LoadResult],
    cpu: dict[str, float],
    duration: float,
    jobs_per_request: int = 1,
) -> PhaseResult:
    """`rps` counts jobs: a request of the batch phase creates `jobs_per_request` of them."""
    latencies = [lat for r in results for lat in r.latencies]
    bad: Counter[str] = Counter()
    for r in results:
        bad.update(r.bad)
    cpu["load"] = 100 * sum(r.cpu_seconds for r in results) / duration
    return PhaseResult(
        phase=phase,
        rps=len(latencies) * jobs_per_request / duration,
        p50_ms=1000 * percentile(latencies, 50),
        p99_ms=1000 * percentile(latencies, 99),
        bad=bad,
        cpu=cpu,
    )


# Reporting ----------------------------------------------------------------------------------

PHASE_LABELS = {
    "live": "(a) GET /live",
    "post": "POST /jobs",
    "postoff": "(d) POST /jobs, no rate limits",
    "raw1": "(b) raw 1 thread",
    "rawN": "(b) raw {procs}x{threads} threads",
    "svc1": "(c) create_job() 1 thread",
    "batch": "POST /batches x{size} (jobs)",
}


def label(phase: str, args: argparse.Namespace) -> str:
    return PHASE_LABELS[phase].format(
        procs=args.raw_procs, threads=args.raw_threads, size=args.batch_size
    )


def report(results: list[PhaseResult], args: argparse.Namespace) -> dict[str, float]:
    rows, rates = [], {}
    for phase in args.phases:
        runs = [r for r in results if r.phase == phase]
        if not runs:
            continue
        rps = median([r.rps for r in runs])
        rates[phase] = rps
        cpu = {k: median([r.cpu[k] for r in runs]) for k in runs[0].cpu}
        served_by = "gunicorn" if phase in HTTP_PHASES else "load"
        if phase == "postoff":
            served_by = "gunicorn_off"  # the peer server's own processes
        bad = sum(sum(r.bad.values()) for r in runs)
        rows.append(
            [
                label(phase, args),
                rps,
                median([r.p50_ms for r in runs]),
                median([r.p99_ms for r in runs]),
                bad,
                cpu["load"],
                cpu["gunicorn"],
                cpu["postgres"],
                cpu["redis"],
                cpu["machine"],
                10 * cpu[served_by] / rps if rps else float("nan"),
                10 * cpu["postgres"] / rps if rps else float("nan"),
                median([r.redis_per_op for r in runs]),
                median([r.pg_xacts_per_op for r in runs]),
                len(runs),
            ]
        )
    print_table(
        f"Medians over runs; {args.duration:g} s measured per phase after {args.warmup:g} s "
        f"warm-up; HTTP concurrency {args.concurrency}; gunicorn {args.worker_class} "
        f"{args.workers} workers; batches of {args.batch_size} over {args.batch_concurrency} "
        "connections, counted in jobs; raw peers insert jobs"
        + ("" if args.raw_without_event else " + job_events in one transaction")
        + " (CPU in % of one core; machine in % of all cores)",
        [
            "phase",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "client/loop CPU%",
            "gunicorn CPU%",
            "postgres CPU%",
            "redis CPU%",
            "machine %",
            "py CPU ms/op",
            "pg CPU ms/op",
            "redis cmds/op",
            "pg xacts/op",
            "runs",
        ],
        rows,
    )
    for r in results:
        if r.bad:
            print(f"  ! {r.phase}: unexpected responses/errors {dict(r.bad)}")
    return rates


def report_ratios(rates: dict[str, float], args: argparse.Namespace) -> None:
    post = rates.get("post")
    if not post:
        return
    rows = []
    for peer in ("live", "postoff", "raw1", "rawN", "svc1"):
        if rates.get(peer):
            target = TARGETS.get(peer)
            ratio = post / rates[peer]
            verdict = "-" if target is None else ("met" if ratio >= target else "MISSED")
            rows.append(
                [
                    f"POST / {label(peer, args)}",
                    f"{ratio:.2f}",
                    "-" if target is None else f"{target:.2f}",
                    verdict,
                ]
            )
    if rates.get("batch"):
        ratio = rates["batch"] / post
        verdict = "met" if ratio >= BATCH_TARGET else "MISSED"
        label_ = f"{label('batch', args)} / POST /jobs"
        rows.append([label_, f"{ratio:.2f}", f"{BATCH_TARGET:.2f}", verdict])
    print_table("Ratios of medians", ["ratio", "value", "target", ""], rows)


# Profiling ----------------------------------------------------------------------------------

# First matching rule wins (see Profile.breakdown): specific call sites first, then the layers
# they sit in. Names follow py-spy's frames, e.g. "create_job (transitions.py:90)".
POST_RULES: list[Rule] = [
    ("kombu: new redis.Redis() per publish", [("Channel._create_client (",)]),
    ("Celery: task-sent event (PUBLISH)", [("EventDispatcher.publish (", "celery/events")]),
    ("Celery: send_task (message, LPUSH)", [("dispatch (", "transitions.py")]),
    ("events: Redis XADD + EXPIRE", [("EventBus._append_to_streams (",)]),
    ("events: Redis script XADD+EXPIRE+PUBLISH", [("EventBus._send (",)]),
    ("events: Socket.IO emit x2 (PUBLISH)", [("EventBus._emit (",)]),
    ("SQL: pool checkout + pre-ping SELECT 1", [("_checkout (", "sqlalchemy/pool/base.py")]),
    ("SQL: COMMIT", [("SessionTransaction.commit (",), ("SessionTransaction._connection_commit",)]),
    ("SQL: build insert().values(**row)", [("ValuesBase.values (", "sqlalchemy/sql/dml.py")]),
    ("SQL: compile / cache key", [("_compile_w_cache (", "sqlalchemy/sql/elements.py")]),
    ("SQL: psycopg execute (driver)", [("psycopg/",)]),
    (
        "SQL: INSERT statements, engine/ORM/session bookkeeping",
        [("create_job (", "transitions.py"), ("record_event (",), ("Database.transaction (",)],
    ),
    ("auth (cached key lookup)", [("authenticate (", "auth.py")]),
    ("pydantic: parse JobCreate body", [("parse_body (", "spec.py")]),
    ("pydantic: JobOut + JSON response", [("json_response (", "spec.py"), ("JobOut.of (",)]),
    ("view: kind input validate + dump", [("create_job (", "api/jobs.py")]),
    ("request teardown (session close)", [("_end_request_session (",)]),
    ("Flask / Werkzeug", [("flask/",), ("werkzeug/",)]),
    ("gunicorn (accept, parse, write, poll)", [("gunicorn/",)]),
]


def profile_post(bench: Bench, seconds: float, cpu_ms_per_post: float) -> None:
    out_dir = bench.args.profile_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text("*\n")
    workers = descendants(bench.server.pid)
    bench.services.reset()
    warmup = 2.0
    start_at = time.time() + 0.3
    window = Window(start_at, start_at + warmup, start_at + warmup + seconds + 1)
    futures = submit_phase(bench, "post", window)
    sleep_until(window.measure_from)
    paths: dict[str, list[Path]] = {"gil": [], "wall": []}
    spies = []
    for pid in workers:
        for kind, kind_paths in paths.items():
            path = out_dir / f"dispatch-post-{kind}-{pid}.txt"
            kind_paths.append(path)
            spies.append(start_pyspy(pid, path, seconds, mode=kind))
    for spy in spies:
        spy.wait(timeout=seconds + 30)
    load = summarize("post", [f.result(timeout=seconds + 60) for f in futures], {}, seconds + 1)
    print(
        f"\nProfile of the gunicorn workers (py-spy, 50 Hz, {seconds:g} s, POST load "
        f"{load.rps:,.0f} req/s while profiled); stacks in {out_dir}"
    )
    print_profiles(Profile.load(paths["gil"]), Profile.load(paths["wall"]), cpu_ms_per_post)


def print_profiles(cpu: Profile, wall: Profile, cpu_ms_per_post: float) -> None:
    if not cpu.total():
        print("  py-spy recorded nothing (is ptrace allowed?)")
        return
    rows = [
        [name, share, share * cpu_ms_per_post / 100, samples]
        for name, samples, share in cpu.breakdown(POST_RULES)
    ]
    print_table(
        f"Python CPU of the gunicorn workers under POST load, by category ({cpu.total()} "
        f"samples of the GIL holder; ms scaled from the {cpu_ms_per_post:.2f} ms of process "
        "CPU per POST measured above)",
        ["category", "% GIL", "~ms CPU/POST", "samples"],
        rows,
    )
    within = "handle_request (gunicorn/workers/"
    rows = [[n, s, c] for n, c, s in wall.breakdown(POST_RULES, within=within)]
    print_table(
        f"Wall time of request threads inside handle_request, by category "
        f"({wall.total(within)} samples, waits on PostgreSQL/Redis/GIL included)",
        ["category", "% wall", "samples"],
        rows,
    )
    print_table(
        "Top leaf functions (self time while holding the GIL)",
        ["function", "% GIL"],
        [[f, s] for f, s in cpu.top_functions(15)],
    )


# Main ---------------------------------------------------------------------------------------


def run_order(phases: Sequence[str], run: int) -> list[str]:
    """The phases of one run, with post and postoff swapped on every second run: the server
    measured second was measured faster (an A/A run, both servers the same, gave 0.86), so a
    fixed order would bias their ratio."""
    order = list(phases)
    if run % 2 == 0 and "post" in order and "postoff" in order:
        i, j = order.index("post"), order.index("postoff")
        order[i], order[j] = order[j], order[i]
    return order


def run_all(bench: Bench) -> list[PhaseResult]:
    args = bench.args
    results = []
    for run in range(1, args.runs + 1):
        for phase in run_order(args.phases, run):
            result = run_phase(bench, phase, args.warmup, args.duration)
            results.append(result)
            print(
                f"run {run} {label(phase, args):<24} {result.rps:8,.0f} ops/s  "
                f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
                f"machine {result.cpu['machine']:3.0f}%"
                + (f"  errors {dict(result.bad)}" if result.bad else ""),
                flush=True,
            )
    return results


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    os.environ.setdefault("CONVEYOR_LOG_LEVEL", "WARNING")
    from app.queue import celery_config

    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(private_services())
        settings = services.settings(openai_api_key="x")
        key = create_key(settings, OWNER)
        server, url = start_server(services, args, UNREACHED_LIMITS)
        stack.callback(server.stop)
        url_off, off_root = None, {}
        if "postoff" in args.phases:
            server_off, url_off = start_server(services, args, NO_LIMITS)
            stack.callback(server_off.stop)
            off_root = {"gunicorn_off": server_off.pid}
        procs = max(2, args.raw_procs)
        pool = stack.enter_context(
            ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
        )
        for future in [pool.submit(_prepare_worker) for _ in range(procs)]:
            future.result()
        roots = {"gunicorn": server.pid, "postgres": services.pg.pid, "redis": services.redis.pid}
        roots |= off_root
        bench = Bench(
            args,
            services,
            server,
            url,
            key,
            url_off,
            pool,
            CpuMeter(roots),
            celery_config(settings),
        )
        if args.variants or args.env:
            print(f"what-if: variants {args.variants or '-'}, env {args.env or '-'}")
        print(f"services and gunicorn ready in {time.monotonic() - began:.1f} s", flush=True)
        results = run_all(bench)
        rates = report(results, args)
        report_ratios(rates, args)
        post_runs = [r for r in results if r.phase == "post"]
        if args.profile_seconds > 0 and post_runs and have_pyspy():
            cpu_ms = median([10 * r.cpu["gunicorn"] / r.rps for r in post_runs if r.rps])
            profile_post(bench, args.profile_seconds, cpu_ms)
        elif args.profile_seconds > 0 and not have_pyspy():
            print("\n(no profile: `.venv/bin/pip install py-spy`)")
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
