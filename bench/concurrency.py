"""Jobs per second of ONE Celery worker process when every model call takes D seconds.

The model simulator answers every call of a measured job in exactly D s with T streamed
tokens (`[[sim duration=D tokens=T]]` in the prompt). One worker process runs
`celery -A workers.celery_app worker --pool P --concurrency S -Q conveyor` with default
settings (DB pool: --db-pool-size / --db-max-overflow override them). The ideal is S/D jobs/s.

How a run measures steady state without the job creator competing for the two cores:
  1. all jobs are created up front with Jobs.create_job(), in two processes, while
     no worker runs: first S warm-up jobs whose durations are spread over (0, D], then more
     D-second jobs than the worker can finish at its ideal rate;
  2. the worker starts and takes the warm-up jobs first (the queue is FIFO); as they end one by
     one its slots pick up measured jobs desynchronised, as under a steady arrival stream,
     instead of in lock-step waves of S;
  3. the window opens when the last warm-up job has finished and lasts --window seconds; the
     backlog is never empty inside it. jobs/s = jobs finished inside / its length, from
     finished_at in PostgreSQL. A worker still busy with warm-up jobs 2D+5 s after its first
     claim is CPU-bound (slot order no longer matters there): the window then opens anyway
     and counts every job that finishes in it ("warm-up capped"). Then the worker is killed:
     jobs still running are abandoned (reported, not failures); every finished job must have
     succeeded at attempt 1.
Inside the window: CPU of the worker, PostgreSQL, Redis, the simulator and the machine, the
worker's RSS and threads, its PostgreSQL connections, the Redis backlog (every 0.5 s), and
Redis commands and PostgreSQL transactions per finished job.

    python -m bench.concurrency                       # threads and gevent at S=200, ~2.5 min
    python -m bench.concurrency --slots 100,200,500 --runs 1
    python -m bench.concurrency --pools threads --db-pool-size 50 --db-max-overflow 50
    python -m bench.concurrency --runs 1 --profile    # py-spy on the worker, see bench/results
    python -m bench.concurrency --pools threads --variants redis-pool
    python -m bench.concurrency --env CONVEYOR_DELTA_FLUSH_INTERVAL=0.25

--variants applies what-if patches (bench/variants.py) inside the worker; --env KEY=VALUE adds
worker environment (any CONVEYOR_* setting).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import variants
from bench.common import (
    BIN,
    RESULTS,
    Child,
    Counters,
    CpuMeter,
    CpuSnapshot,
    Profile,
    Rule,
    Services,
    have_pyspy,
    median,
    print_table,
    private_services,
    read_counters,
    run_main,
    start_pyspy,
    status_kb,
    stop_on_sigterm,
)

WARMUP_OWNER = "bench-warmup"
OWNER = "bench"
CREATORS = 2  # processes creating jobs before a run (the machine has two cores)
SAMPLE_SECONDS = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.concurrency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pools", default="threads,gevent", help="threads,gevent")
    parser.add_argument("--slots", default="200", help="worker concurrency S, e.g. 100,200,500")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0, help="D: seconds per model call")
    parser.add_argument("--tokens", type=int, default=20, help="tokens streamed per call")
    parser.add_argument(
        "--window", type=float, default=8.0, help="target seconds of saturated steady state"
    )
    parser.add_argument("--db-pool-size", type=int, help="CONVEYOR_DB_POOL_SIZE of the worker")
    parser.add_argument("--db-max-overflow", type=int, help="CONVEYOR_DB_MAX_OVERFLOW")
    parser.add_argument("--profile", action="store_true", help="py-spy the first run of each")
    parser.add_argument("--profile-seconds", type=float, default=6.0)
    parser.add_argument("--profile-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--variants", default="", help="what-if patches for the worker, see bench/variants.py"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker env, e.g. CONVEYOR_DELTA_FLUSH_INTERVAL=0.25",
    )
    args = parser.parse_args()
    args.variants = variants.parse(args.variants)
    args.pools = [p for p in args.pools.split(",") if p]
    args.slots = [int(s) for s in args.slots.split(",") if s]
    if set(args.pools) - {"threads", "gevent"}:
        parser.error("--pools takes threads and/or gevent")
    return args


# Creating jobs (in child processes, before the worker starts) ------------------------------

_creator_app: Any = None


def _init_creator(settings_values: dict[str, Any]) -> None:
    global _creator_app  # noqa: PLW0603 - one app per creator process, built once
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    from app import create_app
    from app.config import Settings

    _creator_app = create_app(Settings(**settings_values))


@contextlib.contextmanager
def services_with_creators() -> Iterator[tuple[Services, Any, ProcessPoolExecutor]]:
    """Private PostgreSQL and Redis, the model simulator, and the processes that create jobs
    with Jobs.create_job() against them (each with the app built once)."""
    from devtools.simprocess import SimulatorProcess

    with (
        private_services() as services,
        SimulatorProcess() as sim,
        ProcessPoolExecutor(
            CREATORS,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_creator,
            initargs=(
                {
                    "database_url": services.pg.url,
                    "redis_url": services.redis.url,
                    "openai_api_key": "sim",
                    "openai_base_url": sim.base_url,
                },
            ),
        ) as creators,
    ):
        yield services, sim, creators


def create_batch(owner: str, prompts: list[str]) -> float:
    """create_job() for every prompt, in order; returns the CPU seconds it took."""

    from app.runtime import runtime_of

    began = time.process_time()
    jobs = runtime_of(_creator_app).jobs
    with _creator_app.app_context():
        for prompt in prompts:
            jobs.create_job(owner=owner, kind="chat", input={"prompt": prompt})
    # Idle pooled connections would show up as worker connections in pg_stat_activity.
    _creator_app.extensions["conveyor"].db.dispose()
    return time.process_time() - began


def directive(duration: float, tokens: int) -> str:
    return f"[[sim duration={duration:.3f} tokens={tokens}]]"


def plan_jobs(slots: int, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Warm-up prompts (durations spread over [D, 2D)) and measured prompts (exactly D)."""
    d = args.duration
    warmup = [f"{directive(d * (1 + i / slots), args.tokens)} warm-up {i}" for i in range(slots)]
    # Enough to stay saturated for the window at the ideal rate, plus the D it takes the
    # slots to move from warm-up to measured jobs.
    measured = int(slots / d * (args.window + d)) + slots
    return warmup, [f"{directive(d, args.tokens)} Write a short note."] * measured


def create_jobs(pool: ProcessPoolExecutor, warmup: list[str], measured: list[str]) -> float:
    """Warm-up jobs first (all of them queued before any measured job), then the rest."""
    cpu = 0.0
    for owner, prompts in ((WARMUP_OWNER, warmup), (OWNER, measured)):
        parts = [prompts[i::CREATORS] for i in range(CREATORS)]
        cpu += sum(f.result() for f in [pool.submit(create_batch, owner, p) for p in parts])
    return cpu


# Sampling while the worker runs ---------------------------------------------------------------


@dataclass
class Sample:
    cpu: CpuSnapshot
    rss_kb: int
    threads: int
    pg_conns: int
    pg_active: int
    backlog: int


class Sampler:
    """Every SAMPLE_SECONDS: CPU of every process tree, the worker's RSS and threads, its
    PostgreSQL connections (application_name 'conveyor': only the worker's exist) and the
    Redis backlog (messages not yet taken by the worker)."""

    def __init__(self, meter: CpuMeter, worker_pid: int, services: Services) -> None:
        self.meter = meter
        self.worker_pid = worker_pid
        self.services = services
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psycopg
        import redis

        client = redis.Redis.from_url(self.services.redis.url)
        conninfo = self.services.pg.conninfo()
        with psycopg.connect(conninfo, autocommit=True, application_name="bench") as conn:
            while not self._stop.wait(SAMPLE_SECONDS):
                self.samples.append(self._sample(conn, client))
        client.close()

    def _sample(self, conn: Any, client: Any) -> Sample:
        conns, active = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity "
            "WHERE application_name = 'conveyor'"
        ).fetchone()
        return Sample(
            cpu=self.meter.snapshot(),
            rss_kb=status_kb(self.worker_pid, "VmRSS") or 0,
            threads=status_kb(self.worker_pid, "Threads") or 0,
            pg_conns=conns,
            pg_active=active,
            backlog=client.llen("conveyor:9") + client.llen("conveyor"),
        )

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.cpu.at <= end]


# One run --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    pool: str
    slots: int
    run: int
    error: str | None = None
    jobs_per_s: float = float("nan")
    window_s: float = 0.0
    window_jobs: int = 0
    warmup_s: float = 0.0
    warmup_capped: bool = False
    warmup_in_window: int = 0
    service_p50: float = float("nan")
    service_p99: float = float("nan")
    finished: int = 0
    succeeded: int = 0
    not_first_attempt: int = 0
    abandoned: int = 0
    busy_slots: float = float("nan")
    cpu: dict[str, float] = field(default_factory=dict)
    rss_peak_mb: float = float("nan")
    threads: int = 0
    pg_conns_max: int = 0
    pg_active_max: int = 0
    backlog_min: int = 0
    redis_per_job: dict[str, float] = field(default_factory=dict)
    pg_xacts_per_job: float = float("nan")
    create_cpu_ms: float = float("nan")
    log_problems: int = 0

    @property
    def worker_cpu_ms_per_job(self) -> float:
        cpu = self.cpu.get("worker", float("nan"))
        return 10 * cpu / self.jobs_per_s if self.jobs_per_s else float("nan")


@dataclass
class Ctx:
    args: argparse.Namespace
    services: Services
    sim: Any
    creators: ProcessPoolExecutor


def worker_env(ctx: Ctx) -> dict[str, str]:
    extra = {"OPENAI_BASE_URL": ctx.sim.base_url, "OPENAI_API_KEY": "sim"}
    if ctx.args.db_pool_size is not None:
        extra["CONVEYOR_DB_POOL_SIZE"] = str(ctx.args.db_pool_size)
    if ctx.args.db_max_overflow is not None:
        extra["CONVEYOR_DB_MAX_OVERFLOW"] = str(ctx.args.db_max_overflow)
    extra[variants.ENV] = ",".join(ctx.args.variants)
    extra.update(kv.split("=", 1) for kv in ctx.args.env)
    return ctx.services.env(**extra)


def start_worker(ctx: Ctx, pool: str, slots: int, run: int) -> Child:
    # The Procfile's app, unless what-if patches must be applied first.
    target = "bench.variants" if ctx.args.variants else "workers.celery_app"
    cmd = [str(BIN / "celery"), "-A", target, "worker", "--pool", pool]
    cmd += ["--concurrency", str(slots), "-Q", "conveyor", "--loglevel", "WARNING"]
    cmd += ["-n", f"bench-{pool}-{slots}-{run}@%h"]
    name = f"worker-{pool}-{slots}-{run}"
    return Child(name, cmd, worker_env(ctx), ctx.services.workdir).start()


def run_once(ctx: Ctx, pool: str, slots: int, run: int, profile: bool) -> RunResult:
    result = RunResult(pool, slots, run)
    ctx.services.reset()
    warmup, measured = plan_jobs(slots, ctx.args)
    create_cpu = create_jobs(ctx.creators, warmup, measured)
    result.create_cpu_ms = 1000 * create_cpu / (len(warmup) + len(measured))
    worker = start_worker(ctx, pool, slots, run)
    roots = {
        "worker": worker.pid,
        "postgres": ctx.services.pg.pid,
        "redis": ctx.services.redis.pid,
        "simulator": ctx.sim.pid,
    }
    try:
        with Sampler(CpuMeter(roots), worker.pid, ctx.services) as sampler:
            window = measure_window(ctx, worker, result, profile)
            result.rss_peak_mb = (status_kb(worker.pid, "VmHWM") or 0) / 1024
    finally:
        # Killed, not stopped: a warm shutdown would wait for S running jobs, which are not
        # measured anyway.
        worker.stop(signal.SIGKILL)
    result.log_problems = count_log_problems(worker, ctx.args.profile_dir)
    if window is not None:
        analyse(ctx, result, sampler, *window)
    return result


def measure_window(
    ctx: Ctx, worker: Child, result: RunResult, profile: bool
) -> tuple[float, float, Counters, Counters] | None:
    """Waits for the end of the warm-up, then holds the window open; None on failure."""
    began = time.time()
    started = "SELECT count(*) > 0 FROM jobs WHERE started_at IS NOT NULL"
    result.error = wait_for(ctx, worker, started, 60)
    if result.error:
        return None
    # A worker that keeps up ends every warm-up job within about D; one still busy after 2D+5 s
    # is CPU-bound, where the order of slots no longer matters, so the window opens anyway.
    warmup_cap = 2 * ctx.args.duration + 5
    warmup_left = "SELECT count(*) = 0 FROM jobs WHERE owner = %s AND finished_at IS NULL"
    if wait_for(ctx, worker, warmup_left, warmup_cap, (WARMUP_OWNER,)):
        if not worker.alive():
            result.error = f"worker exited during the warm-up:\n{worker.log_tail()}"
            return None
        result.warmup_capped = True
    start = time.time()
    result.warmup_s = start - began
    before = read_counters(ctx.services)
    profiler = start_profile(ctx, worker, result) if profile else None
    end = start + ctx.args.window
    while time.time() < end:
        if not worker.alive():
            result.error = f"worker exited during the window:\n{worker.log_tail()}"
            return None
        time.sleep(min(0.25, max(0.0, end - time.time())))
    after = read_counters(ctx.services)
    if profiler is not None:
        profiler.join()
    return start, time.time(), before, after


def wait_for(
    ctx: Ctx, worker: Child, sql: str, timeout: float, params: tuple[Any, ...] = ()
) -> str | None:
    """Polls a boolean query; returns an error text if the worker died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            return f"worker exited:\n{worker.log_tail()}"
        if query_one(ctx.services, sql, params):
            return None
        time.sleep(0.2)
    return f"not within {timeout:g} s: {sql % params}\n{worker.log_tail()}"


def query_one(services: Services, sql: str, params: tuple[Any, ...] = ()) -> Any:
    import psycopg

    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def count_log_problems(worker: Child, keep_dir: Path) -> int:
    """Error lines in the worker's log; a log with any is kept in `keep_dir` (the run's own
    directory is deleted at exit)."""
    text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
    problems = sum(1 for line in text.splitlines() if "ERROR" in line or "Traceback" in line)
    if problems:
        keep_dir.mkdir(parents=True, exist_ok=True)
        (keep_dir / ".gitignore").write_text("*\n")
        kept = keep_dir / worker.log_path.name
        kept.write_text(text)
        print(f"  {problems} error lines in the worker log, kept as {kept}")
    return problems


# Counters of PostgreSQL and Redis -------------------------------------------------------------


def per_job(before: Counters, after: Counters, jobs: int) -> dict[str, float]:
    # The sampler's own LLEN and the INFO calls here are not the worker's.
    delta = {
        k: after.redis[k] - before.redis.get(k, 0) for k in after.redis if k not in ("llen", "info")
    }
    return {k: v / jobs for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}


# Analysis -------------------------------------------------------------------------------------

WINDOW_SQL = """
SELECT (SELECT count(*) FROM jobs
         WHERE finished_at > to_timestamp(%(a)s) AND finished_at <= to_timestamp(%(b)s)),
       (SELECT count(*) FROM jobs WHERE owner = %(warmup)s
         AND finished_at > to_timestamp(%(a)s) AND finished_at <= to_timestamp(%(b)s)),
       (SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
               (ORDER BY extract(epoch FROM finished_at - started_at))
          FROM jobs WHERE owner = %(owner)s AND finished_at IS NOT NULL),
       (SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL),
       (SELECT count(*) FROM jobs WHERE status = 'succeeded'),
       (SELECT count(*) FROM jobs WHERE attempt > 1),
       (SELECT count(*) FROM jobs WHERE status = 'running'),
       -- busy slots: mean number of jobs between their claim and their finish in the window
       (SELECT coalesce(sum(extract(epoch FROM
                   least(coalesce(finished_at, to_timestamp(%(b)s)), to_timestamp(%(b)s))
                   - greatest(started_at, to_timestamp(%(a)s)))), 0) / (%(b)s - %(a)s)
          FROM jobs WHERE started_at < to_timestamp(%(b)s)
           AND (finished_at IS NULL OR finished_at > to_timestamp(%(a)s)))
"""


def analyse(
    ctx: Ctx, result: RunResult, sampler: Sampler, a: float, b: float, c0: Counters, c1: Counters
) -> None:
    import psycopg

    with psycopg.connect(ctx.services.pg.conninfo(), autocommit=True) as conn:
        params = {"owner": OWNER, "warmup": WARMUP_OWNER, "a": a, "b": b}
        row = conn.execute(WINDOW_SQL, params).fetchone()
    inside, result.warmup_in_window, service, result.finished, result.succeeded = row[:5]
    result.not_first_attempt, result.abandoned, result.busy_slots = row[5:]
    result.window_s, result.window_jobs = b - a, inside
    result.jobs_per_s = inside / (b - a)
    if service:
        result.service_p50, result.service_p99 = service
    result.redis_per_job = per_job(c0, c1, max(1, inside))
    result.pg_xacts_per_job = (c1.pg_xacts - c0.pg_xacts) / max(1, inside)
    samples = sampler.between(a, b)
    if len(samples) >= 2:
        result.cpu = CpuMeter.usage(samples[0].cpu, samples[-1].cpu)
        result.pg_conns_max = max(s.pg_conns for s in samples)
        result.pg_active_max = max(s.pg_active for s in samples)
        result.backlog_min = min(s.backlog for s in samples)
    if sampler.samples:
        result.threads = max(s.threads for s in sampler.samples)


# Profiling ------------------------------------------------------------------------------------

# First matching rule wins: specific call sites before the layers around them.
WORKER_RULES: list[Rule] = [
    ("DB pool: waiting for a connection", [("QueuePool._do_get (",)]),
    ("deltas: flush (XADD+EXPIRE, Socket.IO PUBLISH)", [("JobContext.flush (",)]),
    ("progress: UPDATE + event + publish", [("JobContext.progress (",)]),
    ("claim: UPDATE + event + publish", [("claim_job (", "transitions.py")]),
    ("finish: UPDATE + event + publish", [("JobContext.finish (",)]),
    ("record_model_call(s): INSERT + UPDATE", [("record_model_call",)]),
    ("model call: open stream (openai, httpx)", [("ModelClient._open_stream (",)]),
    ("model call: read SSE + json.loads", [("_consume (", "client.py"), ("_sse_chunks (",)]),
    ("model call: other", [("ModelClient.stream_chat (",)]),
    ("lease heartbeat", [("ActiveJobs._heartbeat (",)]),
    ("cancel listener", [("ActiveJobs._listen_for_cancels (",)]),
    ("job: other (kind, pydantic)", [("execute_job (", "runner.py")]),
    ("Celery: task tracing, events, ack", [("celery/app/trace.py",)]),
    ("Celery/kombu: consumer loop, fetch", [("celery/worker/",), ("kombu/",)]),
    ("gevent hub", [("gevent/",)]),
]


# Inside the state-change paths (claim, progress, record_model_call, finish: every stack
# through transitions.py), where one transaction plus its event publish spends its time.
TX_RULES: list[Rule] = [
    ("publish: Socket.IO emit (JSON + PUBLISH)", [("EventBus._emit (",)]),
    ("publish: Redis XADD+EXPIRE pipeline", [("EventBus._append_to_streams (",)]),
    ("publish: Redis script XADD+EXPIRE+PUBLISH", [("EventBus._send (",)]),
    ("publish: other", [("EventBus.publish (",)]),
    ("pool checkout + pre-ping SELECT 1", [("_checkout (", "sqlalchemy/pool/base.py")]),
    ("COMMIT", [("SessionTransaction.commit (",)]),
    ("statement compile / cache key", [("_compile_w_cache (",)]),
    ("psycopg: execute, fetch", [("psycopg/",)]),
    (
        "statement build: update()/insert(), .values(), .where()",
        [("sqlalchemy/sql/dml.py",), ("_dml_constructors.py",), ("<sqlalchemy generated",)],
    ),
    ("Session / ORM / engine bookkeeping", [("sqlalchemy/",)]),
]


def start_profile(ctx: Ctx, worker: Child, result: RunResult) -> threading.Thread | None:
    """py-spy on the worker during the window, in the background; prints when done."""
    if not have_pyspy():
        print("(no profile: `.venv/bin/pip install py-spy`)")
        return None
    thread = threading.Thread(
        target=profile_worker, args=(ctx, worker, result.pool, result.slots), daemon=True
    )
    thread.start()
    return thread


def profile_worker(ctx: Ctx, worker: Child, pool: str, slots: int) -> None:
    out = ctx.args.profile_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")
    seconds = min(ctx.args.profile_seconds, ctx.args.window - 1)
    modes = ["gil", "wall"] if pool == "threads" else ["gil"]  # greenlets are not threads
    paths = {m: out / f"concurrency-{pool}-{slots}-{m}.txt" for m in modes}
    spies = [start_pyspy(worker.pid, path, seconds, mode=m, rate=100) for m, path in paths.items()]
    for spy in spies:
        spy.wait(timeout=seconds + 60)
    for mode, path in paths.items():
        print_worker_profile(Profile.load([path]), mode, pool, slots, path)


def print_worker_profile(profile: Profile, mode: str, pool: str, slots: int, path: Path) -> None:
    if not profile.total():
        print(f"  py-spy recorded nothing for {path}")
        return
    what = "Python CPU (GIL holder)" if mode == "gil" else "wall time of all threads"
    rows = [[n, share, count] for n, count, share in profile.breakdown(WORKER_RULES)]
    print_table(
        f"Worker {pool} S={slots}: {what}, by category ({profile.total()} samples; {path})",
        ["category", "%", "samples"],
        rows,
    )
    if mode == "gil":
        within = "transitions.py:"
        tx = [[n, share, count] for n, count, share in profile.breakdown(TX_RULES, within)]
        print_table(
            f"  inside state changes (stacks through transitions.py: {profile.total(within)} "
            f"samples, {100 * profile.total(within) / profile.total():.0f}% of the above)",
            ["step", "%", "samples"],
            tx,
        )
        top = [[f, s] for f, s in profile.top_functions(12)]
        print_table("  top leaf functions", ["function", "%"], top)


# Reporting ------------------------------------------------------------------------------------

SUMMARY_HEADERS = [
    "pool",
    "S",
    "jobs/s",
    "ideal S/D",
    "ratio",
    "job s p50",
    "job s p99",
    "worker CPU%",
    "worker CPU ms/job",
    "pg CPU%",
    "redis CPU%",
    "sim CPU%",
    "machine %",
    "RSS MB",
    "KB/slot",
    "threads",
    "pg conns",
    "pg busy",
    "backlog min",
    "runs",
]


def report(results: list[RunResult], args: argparse.Namespace) -> None:
    for r in results:
        if r.error:
            print(f"\n! {r.pool} S={r.slots} run {r.run}: {r.error}")
    rows = [summary_row(args, pool, slots, results) for slots in args.slots for pool in args.pools]
    print_table(
        f"Medians; D = {args.duration:g} s and {args.tokens} tokens per call; {args.window:g} s "
        "window of saturated steady state (CPU in % of one core, machine in % of all cores; "
        "job s = claim to finish of measured jobs; pg conns/busy = max PostgreSQL connections "
        "of the worker, all / not idle)",
        SUMMARY_HEADERS,
        [row for row in rows if row],
    )
    report_checks(results, args)
    report_per_job(results, args)


def summary_row(
    args: argparse.Namespace, pool: str, slots: int, results: list[RunResult]
) -> list[Any]:
    runs = [r for r in results if r.pool == pool and r.slots == slots]
    good = [r for r in runs if not r.error and r.window_s > 0]
    if not runs:
        return []
    if not good:
        return [pool, slots, "failed", *["-"] * (len(SUMMARY_HEADERS) - 4), len(runs)]
    ideal = slots / args.duration
    jobs = median([r.jobs_per_s for r in good])
    rss = median([r.rss_peak_mb for r in good])

    def med(get: Any) -> float:
        return median([get(r) for r in good])

    return [
        pool,
        slots,
        jobs,
        ideal,
        f"{jobs / ideal:.2f}",
        med(lambda r: r.service_p50),
        med(lambda r: r.service_p99),
        med(lambda r: r.cpu.get("worker", float("nan"))),
        med(lambda r: r.worker_cpu_ms_per_job),
        med(lambda r: r.cpu.get("postgres", float("nan"))),
        med(lambda r: r.cpu.get("redis", float("nan"))),
        med(lambda r: r.cpu.get("simulator", float("nan"))),
        med(lambda r: r.cpu.get("machine", float("nan"))),
        rss,
        rss * 1024 / slots,
        max(r.threads for r in good),
        max(r.pg_conns_max for r in good),
        max(r.pg_active_max for r in good),
        min(r.backlog_min for r in good),
        len(good),
    ]


def report_checks(results: list[RunResult], args: argparse.Namespace) -> None:
    rows = []
    for slots in args.slots:
        for pool in args.pools:
            runs = [r for r in results if r.pool == pool and r.slots == slots]
            if runs:
                rows.append(
                    [
                        f"{pool} S={slots}",
                        sum(r.finished for r in runs),
                        sum(r.succeeded for r in runs),
                        sum(r.finished - r.succeeded for r in runs),
                        sum(r.not_first_attempt for r in runs),
                        sum(r.abandoned for r in runs),
                        sum(r.log_problems for r in runs),
                        median([r.warmup_s for r in runs]),
                        f"{sum(r.warmup_capped for r in runs)}/{len(runs)}",
                        sum(r.warmup_in_window for r in runs),
                    ]
                )
    print_table(
        "Checks, all runs (abandoned = still running when the worker was killed after the "
        "window, not failures)",
        [
            "config",
            "finished",
            "succeeded",
            "failed",
            "attempt > 1",
            "abandoned",
            "log errors",
            "warm-up s",
            "capped",
            "warm-up jobs in window",
        ],
        rows,
    )


def report_per_job(results: list[RunResult], args: argparse.Namespace) -> None:
    rows = []
    for slots in args.slots:
        for pool in args.pools:
            good = [r for r in results if r.pool == pool and r.slots == slots and not r.error]
            if not good:
                continue
            calls: Counter[str] = Counter()
            for r in good:
                calls.update({k: v / len(good) for k, v in r.redis_per_job.items()})
            top = ", ".join(f"{k} {v:.1f}" for k, v in calls.most_common(6))
            rows.append(
                [
                    f"{pool} S={slots}",
                    sum(calls.values()),
                    median([r.pg_xacts_per_job for r in good]),
                    median([r.create_cpu_ms for r in good]),
                    top,
                ]
            )
    print_table(
        "Per job finished in the window (counters over the window / jobs finished in it)",
        ["config", "Redis cmds", "PG xacts", "create_job CPU ms", "top Redis commands"],
        rows,
    )


def progress_line(r: RunResult, args: argparse.Namespace, seconds: float) -> str:
    line = (
        f"run {r.run} {r.pool:<7} S={r.slots:<4} {r.jobs_per_s:7.1f} jobs/s "
        f"(ideal {r.slots / args.duration:.0f})  busy slots {r.busy_slots:5.1f}  "
        f"warm-up {r.warmup_s:4.1f} s  "
        f"worker CPU {r.cpu.get('worker', float('nan')):4.0f}% "
        f"({r.worker_cpu_ms_per_job:4.1f} ms/job)  "
        f"machine {r.cpu.get('machine', float('nan')):3.0f}%  RSS {r.rss_peak_mb:4.0f} MB  "
        f"{r.succeeded}/{r.finished} ok  [{seconds:.0f} s]"
    )
    return line + (f"  ERROR {r.error.splitlines()[0]}" if r.error else "")


# Main -----------------------------------------------------------------------------------------


def run_all(ctx: Ctx) -> list[RunResult]:
    args = ctx.args
    results = []
    profiled: set[tuple[str, int]] = set()
    for run in range(1, args.runs + 1):
        for slots in args.slots:
            for pool in args.pools:
                profile = args.profile and (pool, slots) not in profiled
                profiled.add((pool, slots))
                began = time.monotonic()
                r = run_once(ctx, pool, slots, run, profile)
                results.append(r)
                print(progress_line(r, args, time.monotonic() - began), flush=True)
    return results


def main() -> int:

    args = parse_args()
    stop_on_sigterm()
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        services, sim, creators = stack.enter_context(services_with_creators())
        if args.variants or args.env:
            print(f"what-if: variants {args.variants or '-'}, env {args.env or '-'}")
        print(f"services and simulator ready in {time.monotonic() - began:.1f} s", flush=True)
        results = run_all(Ctx(args, services, sim, creators))
        report(results, args)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
