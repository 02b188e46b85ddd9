"""PostgreSQL transactions and Redis commands per chat job, the worker's alone, for a short and a
long answer (the target: at most 4 transactions per job, whatever the answer's length).

Jobs are created first, with no worker running, spread over owners so that none waits in a
dispatch window. Then one worker (`--pool gevent --concurrency S`, the Procfile's app) runs them
all, and PostgreSQL's counters (pg_stat_database) and Redis's (INFO commandstats) are read
before it starts and after it stopped: what changed is the worker's doing. Its backends have
exited by then, so PostgreSQL has counted all their transactions. Subtracted: this benchmark's
own polls (one transaction each, counted) and what a worker that runs no job does between its
start and its stop (measured first, per second).

Answers stream at --tps tokens per second, as a model's would, so a long answer also shows
what time costs (progress writes, lease renewals): 20 tokens take 0.2 s, 2,000 take 20 s.

    python -m bench.work                       # 20 and 2,000 tokens, 3 runs each (~5 minutes)
    python -m bench.work --tokens 2000 --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from bench import concurrency
from bench.common import (
    BIN,
    Child,
    Counters,
    Services,
    median,
    print_table,
    read_counters,
    run_main,
    stop_on_sigterm,
)
from bench.cpu import settle

OWNERS = 20  # jobs per owner stay under the dispatch window's minimum (32)
POLL_SECONDS = 0.5
TARGET_XACTS = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.work",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokens", default="20,2000", help="answer lengths, e.g. 20,2000")
    parser.add_argument("--jobs", type=int, default=100, help="jobs per run (<= 31 x owners)")
    parser.add_argument("--tps", type=float, default=100.0, help="tokens per second streamed")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    if args.jobs > 31 * OWNERS:
        parser.error(f"--jobs at most {31 * OWNERS}: more would wait in dispatch windows")
    return args


@dataclass
class Work:
    tokens: int
    run: int
    xacts_per_job: float
    redis_per_job: float
    by_command: dict[str, float]
    seconds: float


def worker_env(services: Services, sim_url: str) -> dict[str, str]:
    return services.env(OPENAI_BASE_URL=sim_url, OPENAI_API_KEY="sim")


def start_worker(services: Services, sim_url: str, args: argparse.Namespace, name: str) -> Child:
    cmd = [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "--pool", "gevent"]
    cmd += ["--concurrency", str(args.concurrency), "-Q", "conveyor", "--loglevel", "WARNING"]
    cmd += ["-n", f"{name}@%h", "--without-mingle", "--without-gossip"]
    return Child(name, cmd, worker_env(services, sim_url), services.workdir).start()


def quiet_counters(services: Services) -> Counters:
    """The counters once every backend that exited has reported (PostgreSQL counts a backend's
    transactions when it goes idle or exits, at most once a second)."""
    time.sleep(1.5)
    return read_counters(services)


def difference(before: Counters, after: Counters) -> tuple[int, Counter[str]]:
    redis = Counter({k: after.redis[k] - before.redis.get(k, 0) for k in after.redis})
    for own in ("info", "llen"):
        redis.pop(own, None)
    return after.pg_xacts - before.pg_xacts, +redis


def idle_worker(services: Services, sim_url: str, args: argparse.Namespace) -> tuple[float, float]:
    """Transactions and Redis commands per second of a worker that runs no job, its start and
    stop included (spread over the seconds it ran)."""
    services.reset()
    before = quiet_counters(services)
    began = time.monotonic()
    worker = start_worker(services, sim_url, args, "work-idle")
    try:
        settle(worker)
        time.sleep(10)
    finally:
        worker.stop()
    seconds = time.monotonic() - began
    xacts, redis = difference(before, quiet_counters(services))
    return xacts / seconds, sum(redis.values()) / seconds


def measure(
    services: Services,
    sim_url: str,
    creators: ProcessPoolExecutor,
    args: argparse.Namespace,
    tokens: int,
    run: int,
    idle: tuple[float, float],
) -> Work:
    services.reset()
    prompt = f"[[sim tokens={tokens} tps={args.tps:g}]] Write a note."
    owners = [f"bench-work-{i}" for i in range(OWNERS)]
    shares = [args.jobs // OWNERS + (i < args.jobs % OWNERS) for i in range(OWNERS)]
    futures = [
        creators.submit(concurrency.create_batch, owner, [prompt] * n)
        for owner, n in zip(owners, shares, strict=True)
        if n
    ]
    for future in futures:
        future.result()
    before = quiet_counters(services)
    began = time.monotonic()
    worker = start_worker(services, sim_url, args, f"work-{tokens}-{run}")
    polls = 0
    timeout = 10 * (tokens / args.tps + 5) * (args.jobs / args.concurrency + 1) + 60
    try:
        while True:
            polls += 1
            done = query_one_counted(services)
            if done >= args.jobs:
                break
            if not worker.alive() or time.monotonic() - began > timeout:
                raise RuntimeError(f"{done}/{args.jobs} jobs done:\n{worker.log_tail()}")
            time.sleep(POLL_SECONDS)
    finally:
        worker.stop()
    seconds = time.monotonic() - began
    bad = query_one_counted(services, "SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
    if bad:
        raise RuntimeError(f"{bad} jobs did not succeed:\n{worker.log_tail()}")
    xacts, redis = difference(before, quiet_counters(services))
    xacts -= polls + 1 + idle[0] * seconds  # the polls, the check above, an idle worker's own
    redis_total = sum(redis.values()) - idle[1] * seconds
    return Work(
        tokens,
        run,
        xacts / args.jobs,
        redis_total / args.jobs,
        {k: v / args.jobs for k, v in redis.most_common(8)},
        seconds,
    )


def query_one_counted(
    services: Services, sql: str = "SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL"
) -> int:
    """One query in one transaction (autocommit), as `measure` counts its polls."""
    import psycopg

    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def report(results: list[Work], args: argparse.Namespace) -> None:
    rows = []
    for tokens in args.tokens:
        mine = [r for r in results if r.tokens == tokens]
        xacts = median([r.xacts_per_job for r in mine])
        rows.append(
            [
                tokens,
                f"{tokens / args.tps:g} s",
                f"{xacts:.2f} ({'met' if xacts <= TARGET_XACTS else 'MISSED'})",
                " ".join(f"{r.xacts_per_job:.2f}" for r in mine),
                f"{median([r.redis_per_job for r in mine]):.1f}",
            ]
        )
    print_table(
        f"Per chat job, the worker's work ({args.jobs} jobs, gevent x {args.concurrency}, "
        f"medians of {args.runs}; target: <= {TARGET_XACTS} PostgreSQL transactions)",
        ["tokens", "answer", "PG transactions", "by run", "Redis commands"],
        rows,
    )
    for tokens in args.tokens:
        first = next(r for r in results if r.tokens == tokens)
        top = ", ".join(f"{k} {v:.1f}" for k, v in first.by_command.items())
        print(f"  {tokens} tokens, run 1, Redis commands per job: {top}")


def main() -> int:

    args = parse_args()
    stop_on_sigterm()
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    began = time.monotonic()
    results: list[Work] = []
    with contextlib.ExitStack() as stack:
        services, sim, creators = stack.enter_context(concurrency.services_with_creators())
        idle = idle_worker(services, sim.base_url, args)
        print(f"an idle worker: {idle[0]:.2f} transactions/s, {idle[1]:.1f} Redis commands/s")
        for run in range(1, args.runs + 1):
            for tokens in args.tokens:
                work = measure(services, sim.base_url, creators, args, tokens, run, idle)
                results.append(work)
                print(
                    f"run {run} T={tokens:<5} {work.xacts_per_job:5.2f} PG transactions/job  "
                    f"{work.redis_per_job:6.1f} Redis commands/job  [{work.seconds:.0f} s]",
                    flush=True,
                )
        report(results, args)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
