"""The soak (`make soak`, not part of `make test`): thousands of jobs with random model faults
across several worker processes, some of them SIGKILLed and replaced as it runs. At the end:
every job is terminal, none ended twice, every job's replayed feed has no gap, and the counts of
PostgreSQL, the event streams and the simulator agree. Prints a summary table; exits non-zero
when a check fails.

    python -m tests.chaos.soak                      # 2,000 jobs, 3 workers, a kill every 5 s
    python -m tests.chaos.soak --jobs 500 --kill-every 0
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from app.jobs.events import stream_key
from tests.chaos.conftest import Cluster, running_cluster

# Per job: a fault on its first call only (retried, then it succeeds) or on every call (it
# fails after its attempts with this code), or none.
TRANSIENT = ["429", "500", "drop", "malformed", "hang"]
PERMANENT = {"500": "model_unavailable", "400": "model_bad_request"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50, help="slots per worker")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds; 0: no kills")
    parser.add_argument("--transient-rate", type=float, default=0.2)
    parser.add_argument("--permanent-rate", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    return parser.parse_args()


def plan(args: argparse.Namespace, rng: random.Random) -> list[tuple[str, str | None, str]]:
    """(prompt, expected error code or None, fault label) per job."""
    jobs = []
    for n in range(args.jobs):
        roll = rng.random()
        tokens = rng.randint(10, 60)
        if roll < args.permanent_rate:
            fault = rng.choice(sorted(PERMANENT))
            prompt = f"[[sim fault={fault} tokens={tokens}]] soak {n}"
            jobs.append((prompt, PERMANENT[fault], f"always {fault}"))
        elif roll < args.permanent_rate + args.transient_rate:
            fault = rng.choice(TRANSIENT)
            extra = " retry_after=0.2" if fault == "429" else ""
            prompt = f"[[sim fault={fault} times=1 tokens={tokens}{extra}]] soak {n}"
            jobs.append((prompt, None, f"once {fault}"))
        else:
            jobs.append((f"[[sim tokens={tokens}]] soak {n}", None, "none"))
    return jobs


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="conveyor-soak-") as tmp,
        running_cluster(Path(tmp), web_workers=2, ttft=0.02, tps=200) as cluster,
    ):
        cluster.start_beat()
        env = {
            "CONVEYOR_LLM_TIMEOUT": "2",
            "CONVEYOR_WORKER_CONCURRENCY": str(args.concurrency),
        }
        workers = [
            cluster.start_worker(f"w{i}", pool="gevent", concurrency=args.concurrency, **env)
            for i in range(args.workers)
        ]
        jobs = plan(args, rng)
        print(f"cluster ready in {time.monotonic() - began:.1f} s; submitting {len(jobs)} jobs")

        kills = 0
        done = threading.Event()

        def chaos() -> None:
            nonlocal kills
            while args.kill_every and not done.wait(args.kill_every):
                victim = rng.randrange(len(workers))
                cluster.stop(workers[victim], signal.SIGKILL)
                kills += 1
                workers[victim] = cluster.start_worker(
                    f"w{victim}-{kills}", pool="gevent", concurrency=args.concurrency, **env
                )

        killer = threading.Thread(target=chaos, daemon=True)
        killer.start()
        with ThreadPoolExecutor(max_workers=16) as pool:
            ids = list(pool.map(lambda job: cluster.submit(job[0]), jobs))
        submitted = time.monotonic()
        print(f"submitted in {submitted - began:.1f} s; waiting for every job to end")
        deadline = submitted + args.timeout
        while True:
            open_jobs = cluster.sql(
                "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')"
            )[0][0]
            if open_jobs == 0 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        done.set()
        killer.join()
        return report(cluster, args, jobs, ids, kills, time.monotonic() - began)


def report(
    cluster: Cluster,
    args: argparse.Namespace,
    jobs: list[tuple[str, str | None, str]],
    ids: list[str],
    kills: int,
    seconds: float,
) -> int:
    rows = {
        str(job_id): (status, attempt, error_code, lease, last_seq)
        for job_id, status, attempt, error_code, lease, last_seq in cluster.sql(
            "SELECT id, status, attempt, error_code, lease_expires_at, last_seq FROM jobs"
        )
    }
    terminal_events = Counter(
        {
            str(job_id): n
            for job_id, n in cluster.sql(
                "SELECT job_id, count(*) FROM job_events WHERE type IN "
                "('job.succeeded', 'job.failed', 'job.canceled') GROUP BY job_id"
            )
        }
    )
    problems: list[str] = []
    statuses: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    by_plan: Counter[tuple[str, str]] = Counter()
    client = redis.Redis.from_url(cluster.redis.url)
    gaps = holes = 0
    for (_prompt, expected_error, label), job_id in zip(jobs, ids, strict=True):
        status, attempt, error_code, lease, _last_seq = rows[job_id]
        statuses[status] += 1
        attempts[attempt] += 1
        by_plan[(label, status)] += 1
        if status not in ("succeeded", "failed", "canceled"):
            problems.append(f"{job_id} is still {status}")
        if terminal_events[job_id] != 1:
            problems.append(f"{job_id} has {terminal_events[job_id]} terminal events")
        if lease is not None and status != "running":
            problems.append(f"{job_id} is {status} with a lease")
        if expected_error is None and status != "succeeded":
            problems.append(f"{job_id} ({label}) ended {status} {error_code}")
        if expected_error is not None and error_code != expected_error:
            problems.append(f"{job_id} ({label}) ended {status} {error_code}")
        entries = client.xrange(stream_key(job_id))
        stream_seqs = [int(entry_id.decode().split("-")[1]) for entry_id, _ in entries]
        holes += stream_seqs != list(range(1, len(stream_seqs) + 1))
        if (feed := cluster.feed_problem(job_id)) is not None:
            gaps += 1
            problems.append(f"{job_id}: {feed}")
    client.close()
    recorded_calls = cluster.sql("SELECT count(*) FROM model_calls")[0][0]
    sim_calls = cluster.sim.stats()["requests"]
    if not recorded_calls <= sim_calls <= 3 * len(jobs):
        problems.append(f"model calls: {recorded_calls} recorded, {sim_calls} seen by the model")

    print(
        f"\nSoak: {len(jobs)} jobs, {args.workers} workers x {args.concurrency} slots, "
        f"{kills} worker SIGKILLs, {seconds:.0f} s"
    )
    print(f"  {'outcome':<28} jobs")
    for status, n in sorted(statuses.items()):
        print(f"  {status:<28} {n}")
    print(f"  {'plan -> outcome':<28} jobs")
    for (label, status), n in sorted(by_plan.items()):
        print(f"  {label + ' -> ' + status:<28} {n}")
    print("  attempts: " + ", ".join(f"{k}: {v}" for k, v in sorted(attempts.items())))
    print(
        f"  model calls seen by the simulator {sim_calls}, recorded {recorded_calls} "
        f"(the difference: calls cut by SIGKILL, whose worker could not record them)"
    )
    print(
        f"  jobs whose replayed feed has a gap: {gaps}; streams with a hole, replayed from "
        f"PostgreSQL instead: {holes}"
    )
    print(f"  checks: {'all passed' if not problems else f'{len(problems)} FAILED'}")
    for problem in problems[:20]:
        print(f"    {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
