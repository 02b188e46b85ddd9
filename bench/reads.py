"""Reads at a million jobs: how fast the API answers readers over a big, populated table.

Seeds --jobs jobs (1,000,000) with --events-per-job events each (10: 10,000,000 events) over
--tenants tenants (100) by COPY, in --copiers processes; one tenant (`t000`) holds --big-share
of the jobs (10%: 100,000), the others share the rest (about 9,100 each). Jobs were created over
the last 30 days; 85% succeeded, 7% failed, 4% canceled, the newest 1% are queued or running;
kinds are chat 70%, structured 20%, article 9%, image 1%.

The jobs are seeded at schema revision --seed-at (0014), then the later migrations run on the
populated tables, timed. Then gunicorn as the Procfile runs it (gevent, --workers 2) answers
--readers concurrent readers (20) from a process of their own, one kind of read at a time, for
--seconds each, once per --pauses value: 0, each reader sends its next read as soon as the last
one was answered (the server saturated); 0.2, it waits 0.1 to 0.3 s between reads:

  list          GET /jobs                       the first page (20 jobs), a typical tenant
  list-status   GET /jobs?status=failed          the first page of one status (7% of jobs)
  list-kind     GET /jobs?kind=image             the first page of a rare kind (1% of jobs)
  list-deep     GET /jobs?cursor=...            the page 5,000 rows deep, by the cursor that
                                                 following next_cursor from the first page gave
  job+events    GET /jobs/{id}, then /jobs/{id}/events?after=0   (timed together)
  stats         GET /stats                      a typical tenant (about 9,100 jobs)
  big-list-kind GET /jobs?kind=image             the big tenant
  big-stats     GET /stats                      the big tenant (100,000 jobs)

Readers rotate over the tenants (the big ones: all on `t000`). --runs times (3); printed: p50
and p99 of each read per run, their medians, and whether the targets (list p99 <= 20 ms,
stats p99 <= 100 ms) are met. With --explain, the plans (EXPLAIN ANALYZE, BUFFERS) of the
statements the app issues for each read, captured from the app's own functions.

    python -m bench.reads                                     # 1M jobs, 10M events
    python -m bench.reads --jobs 100000 --runs 1 --explain    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import (
    UNREACHED_LIMITS,
    CpuMeter,
    Services,
    create_keys,
    median,
    percentile,
    print_table,
    private_services,
    run_main,
    start_web,
    stop_on_sigterm,
)

BIG = "t000"
CHUNK = 10_000
LIST_TARGET_MS = 20.0
STATS_TARGET_MS = 100.0
DAYS = 30
KINDS = ("chat",) * 70 + ("structured",) * 20 + ("article",) * 9 + ("image",)
FINISHED = ("succeeded",) * 85 + ("failed",) * 7 + ("canceled",) * 4
INPUT = '{"prompt": "Say hello to the reader of this benchmark"}'
CACHED_INPUT = '{"prompt": "Say hello to the reader of this benchmark", "cache": true}'
OUTPUT = '{"text": "Hello! How can I help you today?", "finish_reason": "stop"}'
EVENT_DATA = {
    "job.queued": '{"attempt": 0}',
    "job.started": '{"attempt": 1, "worker": "seed@host"}',
    "job.progress": '{"attempt": 1, "progress": 50}',
    "job.succeeded": '{"attempt": 1}',
    "job.failed": '{"attempt": 1, "code": "provider_error"}',
    "job.canceled": '{"attempt": 1}',
}
JOB_COLUMNS = (
    "id, owner, kind, status, progress, input, output, error_code, error_message, attempt, "
    "max_attempts, model, last_seq, created_at, updated_at, started_at, finished_at, "
    "dispatched_at, tokens_in, tokens_out, cost_usd, cached"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--events-per-job", type=int, default=10)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--big-share", type=float, default=0.1, help="the big tenant's jobs")
    parser.add_argument("--copiers", type=int, default=2, help="processes seeding by COPY")
    parser.add_argument("--readers", type=int, default=20, help="concurrent readers")
    parser.add_argument("--seconds", type=float, default=5.0, help="each read's phase")
    parser.add_argument(
        "--pauses",
        default="0,0.2",
        help="seconds each reader waits between its reads, one phase per value (0: back to back)",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured, each read")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--deep", type=int, default=5000, help="rows deep of list-deep")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (Procfile: 2)")
    parser.add_argument("--reads", help="comma-separated reads to run (default: all)")
    parser.add_argument("--explain", action="store_true", help="print the reads' plans")
    parser.add_argument(
        "--seed-at",
        default="0014",
        help="the schema revision the jobs are seeded at; later migrations then run on the "
        "populated table, timed ('head': none)",
    )
    return parser.parse_args()


# Seeding ------------------------------------------------------------------------------------


def _ts(at: datetime) -> str:
    return at.isoformat(sep=" ")


def chunk_rows(args: argparse.Namespace, lo: int, hi: int) -> tuple[str, str]:
    """COPY text of the jobs [lo, hi) and of their events. Deterministic per chunk, so any
    process can make any chunk."""
    rng = random.Random(lo)
    start = datetime.now(UTC) - timedelta(days=DAYS)
    step = timedelta(days=DAYS) / args.jobs
    recent = int(args.jobs * 0.99)
    per_job = args.events_per_job
    jobs, events = [], []
    for i in range(lo, hi):
        job_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        big = rng.random() < args.big_share
        owner = BIG if big else f"t{rng.randrange(1, args.tenants):03d}"
        kind = rng.choice(KINDS)
        status = (
            rng.choice(("queued", "queued", "running")) if i >= recent else rng.choice(FINISHED)
        )
        created = start + step * i
        cached = status == "succeeded" and rng.random() < 0.05
        started = created + timedelta(seconds=1) if status != "queued" else None
        finished = None
        if status in ("succeeded", "failed", "canceled"):
            finished = created + timedelta(seconds=1 + rng.expovariate(1 / 8))
        tokens = (9, 11, "0.00000800") if status == "succeeded" else (0, 0, "0")
        jobs.append(
            "\t".join(
                (
                    str(job_id),
                    owner,
                    kind,
                    status,
                    "100" if finished else "0",
                    CACHED_INPUT if cached else INPUT,
                    OUTPUT if status == "succeeded" else r"\N",
                    "provider_error" if status == "failed" else r"\N",
                    "the provider answered 500" if status == "failed" else r"\N",
                    "1" if started else "0",
                    "3",
                    "gpt-4o-mini",
                    str(per_job),
                    _ts(created),
                    _ts(finished or created),
                    _ts(started) if started else r"\N",
                    _ts(finished) if finished else r"\N",
                    _ts(created),
                    str(tokens[0]),
                    str(tokens[1]),
                    tokens[2],
                    "t" if cached and rng.random() < 0.5 else "f",
                )
            )
        )
        last = f"job.{status}" if finished else "job.progress"
        for seq in range(1, per_job + 1):
            kind_of = "job.queued" if seq == 1 else "job.started" if seq == 2 else "job.progress"
            if seq == per_job:
                kind_of = last
            at = _ts(created + timedelta(milliseconds=seq * 100))
            events.append(f"{job_id}\t{seq}\t{kind_of}\t{at}\t{EVENT_DATA[kind_of]}")
    return "\n".join(jobs) + "\n", "\n".join(events) + "\n"


def copy_process(conninfo: str, args: argparse.Namespace, part: int) -> None:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        # No foreign-key checks nor webhook-outbox trigger: the rows are consistent by
        # construction (superuser only, which the private server's user is).
        conn.execute("SET session_replication_role = replica")
        with conn.cursor() as cur:
            for lo in range(part * CHUNK, args.jobs, CHUNK * args.copiers):
                jobs, events = chunk_rows(args, lo, min(args.jobs, lo + CHUNK))
                with conn.transaction():
                    with cur.copy(f"COPY jobs ({JOB_COLUMNS}) FROM STDIN") as copy:
                        copy.write(jobs)
                    with cur.copy(
                        "COPY job_events (job_id, seq, type, at, data) FROM STDIN"
                    ) as copy:
                        copy.write(events)


def seed(services: Services, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds of the COPY and of the VACUUM ANALYZE after it."""
    import psycopg

    context = multiprocessing.get_context("fork")
    began = time.monotonic()
    copiers = [
        context.Process(target=copy_process, args=(services.pg.conninfo(), args, part))
        for part in range(args.copiers)
    ]
    for process in copiers:
        process.start()
    for process in copiers:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a COPY process exited {process.exitcode}")
    copied = time.monotonic()
    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE jobs, job_events")
    return copied - began, time.monotonic() - copied


# The reads ------------------------------------------------------------------------------------

# A read: the paths of its requests, sent one after the other, and the key they carry.
Read = tuple[tuple[str, ...], str]


def walk(url: str, key: str, depth: int) -> str:
    """The cursor `depth` rows deep into `key`'s listing, following next_cursor."""
    import json
    import urllib.request

    cursor, seen = None, 0
    while seen < depth:
        limit = min(100, depth - seen)
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        request = urllib.request.Request(
            f"{url}/api/v1/jobs?{query}", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            page = json.load(response)
        seen += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            raise RuntimeError(f"the listing ends before {depth} rows")
    return cursor


def sample_jobs(services: Services, tenants: list[str]) -> dict[str, list[str]]:
    """A few jobs of each tenant, for job+events."""
    import psycopg

    found: dict[str, list[str]] = {}
    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        for owner in tenants:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE owner = %s ORDER BY created_at DESC, id DESC "
                "OFFSET %s LIMIT 5",
                (owner, random.randrange(0, 5000)),
            ).fetchall()
            found[owner] = [str(row[0]) for row in rows]
    return found


def build_reads(
    args: argparse.Namespace, url: str, keys: dict[str, str], jobs: dict[str, list[str]]
) -> tuple[dict[str, list[Read]], dict[str, str]]:
    """The reads by name, and the cursor `--deep` rows deep of each tenant walked."""
    typical = [owner for owner in keys if owner != BIG]
    base = "/api/v1"
    print(f"  following next_cursor {args.deep:,} rows deep, {len(typical[:20]) + 1} tenants")
    deep = {owner: walk(url, keys[owner], args.deep) for owner in [*typical[:20], BIG]}
    reads: dict[str, list[Read]] = {
        "list": [((f"{base}/jobs",), keys[o]) for o in typical],
        "list-status": [((f"{base}/jobs?status=failed",), keys[o]) for o in typical],
        "list-kind": [((f"{base}/jobs?kind=image",), keys[o]) for o in typical],
        "list-deep": [((f"{base}/jobs?cursor={deep[o]}",), keys[o]) for o in typical[:20]],
        "job+events": [
            ((f"{base}/jobs/{job}", f"{base}/jobs/{job}/events?after=0"), keys[o])
            for o in typical
            for job in jobs[o]
        ],
        "stats": [((f"{base}/stats",), keys[o]) for o in typical],
        "big-list-kind": [((f"{base}/jobs?kind=image",), keys[BIG])],
        "big-stats": [((f"{base}/stats",), keys[BIG])],
    }
    if args.reads:
        chosen = args.reads.split(",")
        unknown = set(chosen) - set(reads)
        if unknown:
            raise SystemExit(f"unknown reads: {', '.join(sorted(unknown))}")
        reads = {name: reads[name] for name in chosen}
    return reads, deep


def reader_process(
    url: str, reads: list[Read], readers: int, seconds: float, pause: float, out: Any
) -> None:
    out.send(asyncio.run(_readers(url, reads, readers, seconds, pause)))


async def _readers(
    url: str, reads: list[Read], readers: int, seconds: float, pause: float
) -> tuple[list[float], int]:
    """Latencies (s) of the reads answered 200, and the count of the others."""
    import aiohttp

    latencies: list[float] = []
    bad = 0
    deadline = time.monotonic() + seconds

    async def reader(session: Any, index: int) -> None:
        nonlocal bad
        turn = index
        while time.monotonic() < deadline:
            paths, key = reads[turn % len(reads)]
            turn += readers
            headers = {"Authorization": f"Bearer {key}"}
            began = time.perf_counter()
            ok = True
            for path in paths:
                async with session.get(url + path, headers=headers) as response:
                    await response.read()
                    ok = ok and response.status == 200
            if ok:
                latencies.append(time.perf_counter() - began)
            else:
                bad += 1
            # Jittered, so that paced readers do not fall into step.
            await asyncio.sleep(random.uniform(0.5, 1.5) * pause)

    connector = aiohttp.TCPConnector(limit=readers)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(reader(session, i) for i in range(readers)))
    return latencies, bad


def measure(
    url: str, reads: list[Read], readers: int, seconds: float, pause: float, meter: CpuMeter
) -> dict[str, float]:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=reader_process, args=(url, reads, readers, seconds, pause, send)
    )
    before = meter.snapshot()
    process.start()
    latencies, bad = receive.recv()
    after = meter.snapshot()
    process.join()
    usage = CpuMeter.usage(before, after)
    return {
        "reads": len(latencies),
        "per_s": len(latencies) / seconds,
        "p50": 1000 * percentile(latencies, 50),
        "p99": 1000 * percentile(latencies, 99),
        "bad": bad,
        "web_cpu": usage["gunicorn"],
        "machine": usage["machine"],
    }


# Plans --------------------------------------------------------------------------------------


def explain(services: Services, cursors: dict[str, str]) -> None:
    """The plans of the statements the app issues for each read, captured as it issues them."""
    from sqlalchemy import create_engine, event, select, text, tuple_
    from sqlalchemy.orm import Session

    from app.api.schemas import decode_cursor
    from app.jobs import transitions
    from app.jobs.listing import SUMMARY_COLUMNS, JobFilter, newest_first
    from app.jobs.states import JobStatus
    from app.models import Job

    engine = create_engine(services.settings().database_url)
    captured: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def capture(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, params))

    def listing(where: JobFilter, cursor: str | None = None) -> None:
        # The statement of app.api.jobs.list_jobs.
        statement = select(*SUMMARY_COLUMNS).where(*where.conditions())
        if cursor is not None:
            statement = statement.where(tuple_(Job.created_at, Job.id) < decode_cursor(cursor))
        with Session(engine) as session:
            session.execute(newest_first(statement).limit(21)).all()

    typical = next(owner for owner in cursors if owner != BIG)
    cases: list[tuple[str, Any]] = [
        ("list", lambda: listing(JobFilter(typical))),
        ("list-status", lambda: listing(JobFilter(typical, status=JobStatus.FAILED))),
        ("list-kind", lambda: listing(JobFilter(typical, kind="image"))),
        ("list-deep", lambda: listing(JobFilter(typical), cursors[typical])),
        ("big-list-kind", lambda: listing(JobFilter(BIG, kind="image"))),
    ]
    for owner, name in ((typical, "stats"), (BIG, "big-stats")):
        cases.append((name, lambda owner=owner: transitions.job_stats(Session(engine), owner)))
    for name, call in cases:
        captured.clear()
        call()
        for statement, params in captured:
            with engine.connect() as conn:
                plan = conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params
                ).all()
            print(f"\n-- {name}\n{statement}\n" + "\n".join(row[0] for row in plan))
    with engine.connect() as conn:
        sizes = conn.execute(
            text(
                "SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class "
                "WHERE relname LIKE 'jobs%' OR relname LIKE 'job_events%' ORDER BY relname"
            )
        ).all()
    print("\n" + "\n".join(f"  {name}: {size}" for name, size in sizes))
    engine.dispose()


# Orchestration --------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, pause: float, results: dict[str, list[dict[str, float]]]
) -> bool:
    rows = []
    for name, runs in results.items():
        rows.append(
            [
                name,
                *(f"{r['p50']:.1f}/{r['p99']:.1f}" for r in runs),
                median([r["p50"] for r in runs]),
                median([r["p99"] for r in runs]),
                median([r["per_s"] for r in runs]),
                sum(int(r["bad"]) for r in runs),
                median([r["web_cpu"] for r in runs]),
                median([r["machine"] for r in runs]),
            ]
        )
    print_table(
        f"{args.readers} concurrent readers, "
        + (f"each pausing ~{pause:g} s between reads" if pause else "back to back")
        + f", {args.seconds:g} s each read and run (ms)",
        [
            "read",
            *(f"run {i + 1} p50/p99" for i in range(args.runs)),
            "p50",
            "p99",
            "reads/s",
            "non-200",
            "web CPU %",
            "machine %",
        ],
        rows,
    )
    met = True
    for name, runs in results.items():
        target = STATS_TARGET_MS if name.endswith("stats") else LIST_TARGET_MS
        if "list" not in name and "stats" not in name:
            continue
        p99 = median([r["p99"] for r in runs])
        verdict = "met" if p99 <= target else "MISSED"
        met = met and p99 <= target
        print(f"  {name}: p99 {p99:.1f} ms, target <= {target:g} ms: {verdict}")
    return met


def main() -> int:
    from alembic import command

    from app.migrate import alembic_config, upgrade

    args = parse_args()
    stop_on_sigterm()
    with private_services() as services:
        print(
            f"seeding {args.jobs:,} jobs and {args.jobs * args.events_per_job:,} events by COPY "
            f"in {args.copiers} processes"
        )
        if args.seed_at != "head":
            command.downgrade(alembic_config(services.pg.url), args.seed_at)
        copy_s, vacuum_s = seed(services, args)
        print(f"  COPY {copy_s:.1f} s, VACUUM ANALYZE {vacuum_s:.1f} s")
        began = time.monotonic()
        upgrade(services.pg.url)
        migrate_s = time.monotonic() - began
        print(f"  migrations after {args.seed_at}, on the populated tables: {migrate_s:.1f} s")
        tenants = [f"t{i:03d}" for i in range(args.tenants)]
        keys = create_keys(services.settings(), tenants)
        env = services.env(OPENAI_API_KEY="x", **UNREACHED_LIMITS)
        server, url = start_web(services, env, args.workers)
        try:
            reads, deep = build_reads(args, url, keys, sample_jobs(services, tenants))
            if args.explain:
                explain(services, deep)
            meter = CpuMeter({"gunicorn": server.pid})
            for read in reads.values():
                measure(url, read, args.readers, args.warmup, 0, meter)
            pauses = [float(p) for p in args.pauses.split(",")]
            results: dict[float, dict[str, list[dict[str, float]]]] = {
                pause: {name: [] for name in reads} for pause in pauses
            }
            for run in range(args.runs):
                for pause in pauses:
                    for name, read in reads.items():
                        figures = measure(url, read, args.readers, args.seconds, pause, meter)
                        results[pause][name].append(figures)
                print(f"  run {run + 1} of {args.runs} done", flush=True)
        finally:
            server.stop()
    print(f"\nseeding: COPY {copy_s:.1f} s + VACUUM ANALYZE {vacuum_s:.1f} s")
    print(f"migrations after {args.seed_at}, on the populated tables: {migrate_s:.1f} s")
    met = [report(args, pause, by_read) for pause, by_read in results.items()]
    return 0 if all(met) else 1


if __name__ == "__main__":
    run_main(main)
