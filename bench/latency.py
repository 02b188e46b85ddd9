"""Dispatch latency: from a client sending `POST /api/v1/jobs` to the job's `job.started`,
against a bare Celery task's `send_task` to the moment its body starts, on the same Redis.

  conveyor  gunicorn as the Procfile runs it (gevent, 2 workers) and one Conveyor worker
            (`celery -A workers.celery_app worker --pool gevent --concurrency S -Q conveyor`).
            A client process POSTs chat jobs whose answer takes --hold seconds from the
            simulator; latency = the `at` of the job's `job.started` event in PostgreSQL (the
            worker's clock, read just before its claim's UPDATE) minus the client's clock
            just before it sent the request. This path includes the HTTP request, the job's
            INSERT (the intake's group commit), its `job.queued` event in Redis, the Celery
            message, the broker, the worker's receipt and the claim's preparation.
  bare      `celery -A bench.bare worker` with the same pool and concurrency; a client
            process calls `send_task("bare.started", ...)`; the task's first statement reads
            the clock, then it holds its slot for --hold seconds. Latency = that reading minus
            the client's clock just before `send_task`. No HTTP, no database.
  commit    not a target's peer, a reading aid: the same sender first stores a job row and its
            event in one transaction (the dispatch benchmark's raw peer (b), psycopg, no
            HTTP), then sends the same bare task; its latency starts before the INSERT. What
            Conveyor takes beyond it is the HTTP request, the intake's hand-offs, the
            job.queued event's Redis call and its worker's path to the claim.

All peers' clocks are the same machine's wall clock (`time.time()`). The loads, each
open-loop (sends follow a schedule, never waiting for an answer): idle, one job every
--idle-interval seconds (each has started and finished before the next is sent), and each of
--rates jobs per second. The first --warmup seconds of each phase are sent but not counted.
Each peer goes first in turn, run by run; medians over --runs are printed with the
ratios against the targets (p50 <= 1.2 x bare, p99 <= 2 x bare), and how many jobs per second
each peer actually started: a peer that cannot keep up with a rate builds a backlog, and its
latency is then the backlog's age, not a dispatch time.

    python -m bench.latency                     # about 4 minutes
    python -m bench.latency --runs 1 --profile  # py-spy of the web and worker, last rate
    python -m bench.latency --rates "" --variants no-task-events   # idle only, a what-if
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
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
    Services,
    create_key,
    have_pyspy,
    median,
    percentile,
    print_table,
    private_services,
    run_main,
    sleep_until,
    start_pyspy,
    start_web,
    stop_on_sigterm,
    wait_until,
)

OWNER = "bench-latency"
PEERS = ("conveyor", "bare", "commit")
# The commit peer's tasks run on the bare peer's worker.
WORKERS = ("conveyor", "bare")
TARGET_P50, TARGET_P99 = 1.2, 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rates",
        default="200,50",
        help="jobs/s of the loaded phases, comma-separated (e.g. 200,50)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured s, loaded phases")
    parser.add_argument("--idle-jobs", type=int, default=30, help="measured jobs, idle phase")
    parser.add_argument("--idle-interval", type=float, default=0.2, help="s between idle jobs")
    parser.add_argument("--warmup", type=float, default=1.0, help="s sent, not counted")
    parser.add_argument("--hold", type=float, default=0.05, help="s each job holds its slot")
    parser.add_argument("--concurrency", type=int, default=200, help="S of both workers")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn (Procfile: 2)")
    parser.add_argument("--profile", action="store_true", help="py-spy a loaded Conveyor phase")
    parser.add_argument("--profile-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--variants", default="", help="what-if patches for Conveyor's worker, bench/variants.py"
    )
    args = parser.parse_args()
    args.variants = variants.parse(args.variants)
    args.loads = ["idle", *(f"{float(rate):g}" for rate in args.rates.split(",") if rate)]
    return args


# Senders (child processes) ------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """`count` sends at `start_at + i / rate` (wall clock); the first `warmup` not counted."""

    start_at: float
    rate: float
    count: int
    warmup: int

    def at(self, i: int) -> float:
        return self.start_at + i / self.rate


@dataclass
class Sent:
    """What a sender saw: per counted send, its key (job id or number) and its send time."""

    sent_at: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    late_ms_p99: float = 0.0  # how far behind its schedule the sender itself fell

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def post_jobs(url: str, key: str, prompt: str, schedule: Schedule) -> Sent:
    return asyncio.run(_post_jobs(url, key, prompt, schedule))


async def _post_jobs(url: str, key: str, prompt: str, schedule: Schedule) -> Sent:
    import aiohttp

    sent = Sent()
    late: list[float] = []
    body = json.dumps({"kind": "chat", "input": {"prompt": prompt}}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        began = time.time()
        try:
            async with session.post(f"{url}/api/v1/jobs", data=body, headers=headers) as answer:
                payload = await answer.json(content_type=None)
                if answer.status != 202:
                    sent.error(str(answer.status))
                    return
        except Exception as exc:  # the run reports errors, it must not die of one
            sent.error(type(exc).__name__)
            return
        if i >= schedule.warmup:
            sent.sent_at[payload["id"]] = began

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for i in range(schedule.count):
            await asyncio.sleep(max(0.0, schedule.at(i) - time.time()))
            late.append(time.time() - schedule.at(i))
            tasks.append(asyncio.create_task(one(session, i)))
        await asyncio.gather(*tasks)
    sent.late_ms_p99 = 1000 * percentile(late, 99)
    return sent


def send_bare(redis_url: str, hold: float, schedule: Schedule, conninfo: str | None) -> Sent:
    """`send_task` per scheduled send; given `conninfo` (the commit peer), first the job's
    row and its event in one transaction, as the dispatch benchmark's raw peer (b) does."""
    import psycopg

    from bench import bare
    from bench.dispatch import insert_job

    bare.app.conf.broker_url = redis_url
    sent = Sent()
    late: list[float] = []
    with contextlib.ExitStack() as stack:
        conn = None
        if conninfo is not None:
            conn = stack.enter_context(psycopg.connect(conninfo, autocommit=True))
        producer = stack.enter_context(bare.app.producer_or_acquire())
        for i in range(schedule.count):
            sleep_until(schedule.at(i))
            began = time.time()
            late.append(began - schedule.at(i))
            if conn is not None:
                insert_job(conn)
            bare.started.apply_async((i, began, hold), producer=producer)
            if i >= schedule.warmup:
                sent.sent_at[str(i)] = began
    sent.late_ms_p99 = 1000 * percentile(late, 99)
    return sent


def _prepare_sender() -> int:
    """Imports what the senders need, so no measured phase pays for them."""
    import aiohttp  # noqa: F401

    import bench.bare  # noqa: F401

    return os.getpid()


# Orchestration ------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    services: Services
    sim: Any
    url: str
    key: str
    web: Child
    workers: dict[str, Child]
    senders: ProcessPoolExecutor
    meter: CpuMeter

    @property
    def prompt(self) -> str:
        return f"[[sim tokens=5 duration={self.args.hold:g}]] Say hello."


@dataclass
class PhaseResult:
    peer: str
    load: str
    run: int
    latencies_ms: list[float]
    expected: int
    errors: dict[str, int]
    sender_late_ms: float
    cpu: dict[str, float]
    started_per_s: float  # counted jobs started per second, first start to last
    # Conveyor's medians: send -> the view's created_at, and created_at -> job.started.
    to_view_ms: float = float("nan")
    view_to_start_ms: float = float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


def started_times(bench: Bench, peer: str) -> dict[str, float]:
    """When each job's body started: job.started's `at` in PostgreSQL, or the bare task's
    own reading."""
    if peer != "conveyor":
        import redis

        from bench.bare import STARTED_KEY

        client = redis.Redis.from_url(bench.services.redis.url)
        try:
            rows = [json.loads(raw) for raw in client.lrange(STARTED_KEY, 0, -1)]
        finally:
            client.close()
        return {str(number): started for number, _sent, started in rows}
    import psycopg

    with psycopg.connect(bench.services.pg.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT job_id, at FROM job_events WHERE type = 'job.started' AND seq = 2"
        ).fetchall()
    return {str(job_id): at.timestamp() for job_id, at in rows}


def created_times(bench: Bench) -> dict[str, float]:
    """Each job's created_at: the clock the API view read before handing the job to the
    intake (after HTTP, authentication and validation; before the INSERT)."""
    import psycopg

    with psycopg.connect(bench.services.pg.conninfo(), autocommit=True) as conn:
        rows = conn.execute("SELECT id, created_at FROM jobs").fetchall()
    return {str(job_id): at.timestamp() for job_id, at in rows}


def reset(bench: Bench) -> None:
    import redis

    from bench.bare import STARTED_KEY

    bench.services.reset()
    client = redis.Redis.from_url(bench.services.redis.url)
    try:
        client.delete(STARTED_KEY)
    finally:
        client.close()


def run_phase(
    bench: Bench, peer: str, load: str, run: int, seconds: float | None = None
) -> PhaseResult:
    """One phase: `load` is "idle" or a rate in jobs/s."""
    args = bench.args
    reset(bench)
    if load == "idle":
        rate = 1 / args.idle_interval
        count = args.idle_jobs + round(args.warmup * rate)
    else:
        rate = float(load)
        count = round(((seconds or args.seconds) + args.warmup) * rate)
    schedule = Schedule(time.time() + 0.5, rate, count, round(args.warmup * rate))
    if peer == "conveyor":
        future = bench.senders.submit(post_jobs, bench.url, bench.key, bench.prompt, schedule)
    else:
        conninfo = bench.services.pg.conninfo() if peer == "commit" else None
        redis_url = bench.services.redis.url
        future = bench.senders.submit(send_bare, redis_url, args.hold, schedule, conninfo)
    sleep_until(schedule.at(schedule.warmup))
    before = bench.meter.snapshot()
    sent = future.result(timeout=count / rate + 120)
    after = bench.meter.snapshot()
    expected = schedule.count - schedule.warmup
    started: dict[str, float] = {}

    def all_started() -> bool:
        nonlocal started
        started = started_times(bench, peer)
        return all(key in started for key in sent.sent_at)

    with contextlib.suppress(TimeoutError):
        wait_until(all_started, 60, f"{peer} jobs started")
    latencies = [
        1000 * (started[key] - sent_at) for key, sent_at in sent.sent_at.items() if key in started
    ]
    starts = [started[key] for key in sent.sent_at if key in started]
    span = max(starts, default=0) - min(starts, default=0)
    throughput = (len(starts) - 1) / span if span > 0 else float("nan")
    split = (float("nan"), float("nan"))
    if peer == "conveyor":
        created = created_times(bench)
        keys = [key for key in sent.sent_at if key in started and key in created]
        split = (
            median([1000 * (created[key] - sent.sent_at[key]) for key in keys]),
            median([1000 * (started[key] - created[key]) for key in keys]),
        )
    if peer == "conveyor" and sent.errors:
        # What the web process said about them (its log is gone once the run ends).
        lines = [line for line in bench.web.log_tail(400).splitlines() if " ERROR " in line]
        for line in lines[-3:]:
            print(f"  web: {line[:300]}")
    missing = len(sent.sent_at) - len(latencies)
    errors = dict(sent.errors) | ({"not started": missing} if missing else {})
    cpu = CpuMeter.usage(before, after)
    return PhaseResult(
        peer, load, run, latencies, expected, errors, sent.late_ms_p99, cpu, throughput, *split
    )


def profile_loaded(bench: Bench) -> None:
    """py-spy (GIL holder, where Python CPU goes; and every thread, where wall time goes) on
    the gunicorn workers and the Conveyor worker during one loaded phase."""
    from bench.common import descendants

    out = bench.args.profile_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")
    seconds = bench.args.seconds
    targets = {"web": descendants(bench.web.pid), "worker": [bench.workers["conveyor"].pid]}
    paths: dict[tuple[str, str], list[Path]] = {}
    spies = []
    for name, pids in targets.items():
        for pid in pids:
            for mode in ("gil", "wall"):
                path = out / f"latency-{name}-{mode}-{pid}.txt"
                paths.setdefault((name, mode), []).append(path)
                spies.append(start_pyspy(pid, path, seconds, mode=mode, rate=100))
    result = run_phase(bench, "conveyor", bench.args.loads[-1], 0)
    for spy in spies:
        spy.wait(timeout=seconds + 60)
    print(
        f"\nProfiled loaded phase: p50 {result.p50:.1f} ms, p99 {result.p99:.1f} ms "
        f"(profiling slows it); stacks in {out}"
    )
    from bench.concurrency import WORKER_RULES
    from bench.dispatch import POST_RULES

    rules = {"web": POST_RULES, "worker": WORKER_RULES}
    for (name, mode), files in sorted(paths.items()):
        profile = Profile.load(files)
        print_table(
            f"{name}, {mode} ({'GIL holder: CPU' if mode == 'gil' else 'every thread: wall'}, "
            f"{profile.total()} samples), by category",
            ["category", "%", "samples"],
            [[n, share, count] for n, count, share in profile.breakdown(rules[name])],
        )
        print_table(
            f"{name}, {mode}: top leaf functions",
            ["function", "%"],
            [[f, share] for f, share in profile.top_functions(12)],
        )


# Report ---------------------------------------------------------------------------------------


def report(results: list[PhaseResult], args: argparse.Namespace) -> None:
    rows, medians = [], {}
    for load in args.loads:
        for peer in PEERS:
            runs = [r for r in results if r.peer == peer and r.load == load]
            p50, p99 = median([r.p50 for r in runs]), median([r.p99 for r in runs])
            medians[peer, load] = (p50, p99)
            cpu = {k: median([r.cpu[k] for r in runs]) for k in runs[0].cpu}
            rows.append(
                [
                    f"{peer}, {describe(load, args)}",
                    p50,
                    p99,
                    " ".join(f"{r.p50:.1f}/{r.p99:.1f}" for r in runs),
                    f"{median([len(r.latencies_ms) for r in runs]):.0f}/{runs[0].expected}",
                    median([r.started_per_s for r in runs]),
                    sum(sum(r.errors.values()) for r in runs),
                    median([r.to_view_ms for r in runs]),
                    median([r.view_to_start_ms for r in runs]),
                    median([r.sender_late_ms for r in runs]),
                    cpu["web"],
                    cpu["conveyor" if peer == "conveyor" else "bare"],
                    cpu["postgres"],
                    cpu["redis"],
                    cpu["machine"],
                ]
            )
    print_table(
        f"send -> start latency, ms, medians of {args.runs} runs (worker --pool gevent "
        f"--concurrency {args.concurrency}; jobs hold their slot {args.hold:g} s; CPU in % of "
        "one core during the phase, machine in % of all cores)",
        [
            "peer, load",
            "p50",
            "p99",
            "p50/p99 by run",
            "counted",
            "started/s",
            "errors",
            "send->view p50",
            "view->start p50",
            "sender late p99",
            "web CPU%",
            "worker CPU%",
            "pg CPU%",
            "redis CPU%",
            "machine%",
        ],
        rows,
    )
    for r in results:
        if r.errors:
            print(f"  ! run {r.run} {r.peer} {r.load}: {r.errors}")
    ratio_rows = []
    for load in args.loads:
        for peer in PEERS[1:]:
            ratio_rows += ratio_rows_of(results, medians, load, peer, args)
    print_table(
        "Ratios of medians", ["ratio", "medians", "value", "by run", "target", ""], ratio_rows
    )


def ratio_rows_of(
    results: list[PhaseResult],
    medians: dict[tuple[str, str], tuple[float, float]],
    load: str,
    peer: str,
    args: argparse.Namespace,
) -> list[list[str]]:
    """Conveyor against `peer` at `load`: the targets are against the bare peer; the commit
    peer's ratios are for reading them (what the commit and the HTTP request cost)."""
    rows = []
    (c50, c99), (p50, p99) = medians["conveyor", load], medians[peer, load]
    for name, c, b, target in (("p50", c50, p50, TARGET_P50), ("p99", c99, p99, TARGET_P99)):
        ratio = c / b if b else float("nan")
        verdict = ("met" if ratio <= target else "MISSED") if peer == "bare" else ""
        by_run = [
            getattr(cr, name) / getattr(pr, name)
            for cr, pr in zip(
                [r for r in results if r.peer == "conveyor" and r.load == load],
                [r for r in results if r.peer == peer and r.load == load],
                strict=False,
            )
        ]
        rows.append(
            [
                f"{describe(load, args)}: {name} conveyor / {peer}",
                f"{c:.1f} / {b:.1f} ms",
                f"{ratio:.2f}",
                " ".join(f"{x:.2f}" for x in by_run),
                f"<= {target:g}" if peer == "bare" else "-",
                verdict,
            ]
        )
    return rows


def describe(load: str, args: argparse.Namespace) -> str:
    if load == "idle":
        return f"idle (1 every {args.idle_interval:g} s)"
    return f"{load} jobs/s"


def progress_line(r: PhaseResult, args: argparse.Namespace) -> str:
    errors = f"  errors {r.errors}" if r.errors else ""
    return (
        f"run {r.run} {r.peer:<8} {describe(r.load, args):<22} {len(r.latencies_ms):5d} jobs  "
        f"{r.started_per_s:5.0f} started/s  "
        f"p50 {r.p50:6.1f} ms  p99 {r.p99:6.1f} ms  sender late p99 {r.sender_late_ms:5.1f} ms  "
        f"machine {r.cpu['machine']:3.0f}%{errors}"
    )


# Main -----------------------------------------------------------------------------------------


def start_worker(
    bench_env: dict[str, str], services: Services, peer: str, args: argparse.Namespace
) -> Child:
    """`peer`'s worker; Conveyor's with the what-if --variants applied, when given."""
    slots = args.concurrency
    app, queue = ("bench.bare", "bare") if peer == "bare" else ("workers.celery_app", "conveyor")
    if peer == "conveyor" and args.variants:
        app = "bench.variants"
        bench_env = bench_env | {variants.ENV: ",".join(args.variants)}
    cmd = [str(BIN / "celery"), "-A", app, "worker", "--pool", "gevent"]
    cmd += ["--concurrency", str(slots), "-Q", queue, "--loglevel", "WARNING"]
    cmd += ["-n", f"latency-{peer}@%h", "--without-mingle", "--without-gossip"]
    return Child(f"worker-{peer}", cmd, bench_env, services.workdir).start()


def main() -> int:
    from devtools.simprocess import SimulatorProcess

    args = parse_args()
    stop_on_sigterm()
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    began = time.monotonic()
    results: list[PhaseResult] = []
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(private_services())
        sim = stack.enter_context(SimulatorProcess())
        env = services.env(OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY="sim", **UNREACHED_LIMITS)
        key = create_key(services.settings(openai_api_key="sim"), OWNER)
        web, url = start_web(services, env, args.web_workers)
        stack.callback(web.stop)
        workers = {peer: start_worker(env, services, peer, args) for peer in WORKERS}
        for worker in workers.values():
            stack.callback(worker.stop)
        senders = stack.enter_context(
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        )
        senders.submit(_prepare_sender).result()
        roots = {"web": web.pid, "postgres": services.pg.pid, "redis": services.redis.pid}
        roots |= {peer: worker.pid for peer, worker in workers.items()}
        bench = Bench(args, services, sim, url, key, web, workers, senders, CpuMeter(roots))
        warm_up(bench)
        if args.variants:
            print(f"what-if: Conveyor's worker with variants {args.variants}")
        print(f"services, web and workers ready in {time.monotonic() - began:.1f} s", flush=True)
        for run in range(1, args.runs + 1):
            # Each peer goes first in turn: none is always measured on a warmer machine.
            shift = (run - 1) % len(PEERS)
            order = PEERS[shift:] + PEERS[:shift]
            for load in args.loads:
                for peer in order:
                    result = run_phase(bench, peer, load, run)
                    results.append(result)
                    print(progress_line(result, args), flush=True)
        report(results, args)
        if args.profile:
            if have_pyspy():
                profile_loaded(bench)
            else:
                print("\n(no profile: py-spy not found)")
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


def warm_up(bench: Bench) -> None:
    """Two seconds of each peer at a tenth of the rate, not counted: both workers have their
    connections and the web process its pools before the first measured phase."""
    rate = max(1.0, max((float(load) for load in bench.args.loads[1:]), default=50.0) / 10)
    for peer in PEERS:
        run_phase(bench, peer, f"{rate:g}", 0, seconds=2.0)


if __name__ == "__main__":
    run_main(main)
