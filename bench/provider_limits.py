"""Pool-wide provider limits under load: the simulator answers 429 past --rpm requests per
--period (any model), Conveyor is configured with the same limit for the jobs' model, --jobs
chat jobs are queued at once and --workers worker processes (plus beat, whose sweep publishes
the deferred jobs at their turn) run them. Reported from the simulator's own request log:
the most requests it saw in any window of the period, its 429s, and the pauses Conveyor
recorded; and from PostgreSQL: the jobs' outcomes and the attempts they used.

    python -m bench.provider_limits                      # the issue's run: 60 RPM, 500 jobs
    python -m bench.provider_limits --period 10 --jobs 100   # the same shape in ~20 s

The full run takes about jobs / rpm minutes (500 / 60: about 9 minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import BIN, Child, private_services, run_main, stop_on_sigterm, wait_until
from devtools.simprocess import SimulatorProcess

MODEL = "sim-small"
OWNER = "bench-provider-limits"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.provider_limits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rpm", type=int, default=60, help="requests per period, both sides")
    parser.add_argument("--period", type=float, default=60.0, help="the window, seconds")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--slots", type=int, default=50, help="threads per worker process")
    parser.add_argument(
        "--sweeper-interval", type=float, default=5.0, help="beat's sweep, seconds (default 15)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="give up after, seconds")
    return parser.parse_args()


def most_in_window(times: list[float], window: float) -> int:
    """The most arrivals within any half-open window [t, t + window), t an arrival."""
    best, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def create_jobs(settings: Any, count: int) -> None:
    from app import create_app
    from app.runtime import runtime_of

    app = create_app(settings)
    jobs = runtime_of(app).jobs
    with app.app_context():
        for n in range(count):
            jobs.create_job(owner=OWNER, kind="chat", input={"prompt": f"job {n} [[sim tokens=8]]"})
    runtime_of(app).db.dispose()


def job_outcomes(services: Any) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT status, count(*), sum(attempt), sum(max_attempts - 3), "
            "max(finished_at) - min(created_at) FROM jobs WHERE owner = %s GROUP BY status",
            (OWNER,),
        ).fetchall()
    return {
        row[0]: {
            "jobs": row[1],
            "attempts": int(row[2]),
            "attempts_given_back": int(row[3]),
            "span_s": row[4].total_seconds() if row[4] else None,
        }
        for row in rows
    }


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    limits = {MODEL: {"rpm": args.rpm, "period": args.period}}
    with (
        private_services() as services,
        SimulatorProcess(ttft=0.05, tps=200, rpm=args.rpm, rpm_period=args.period) as sim,
    ):
        env = services.env(
            OPENAI_BASE_URL=sim.base_url,
            OPENAI_API_KEY="sim",
            CONVEYOR_DEFAULT_MODEL=MODEL,
            CONVEYOR_PROVIDER_LIMITS=json.dumps(limits),
            CONVEYOR_SWEEPER_INTERVAL=str(args.sweeper_interval),
        )
        settings = services.settings(
            openai_base_url=sim.base_url,
            openai_api_key="sim",
            default_model=MODEL,
            provider_limits=limits,
        )
        print(
            f"simulator and Conveyor at {args.rpm} requests / {args.period:g} s; "
            f"{args.jobs} jobs; {args.workers} worker processes x {args.slots} threads"
        )
        create_jobs(settings, args.jobs)
        began = time.time()
        beat = [str(BIN / "celery"), "-A", "workers.celery_app", "beat", "--loglevel", "WARNING"]
        beat += ["--schedule", str(services.workdir / "beat-schedule")]
        children = [Child("beat", beat, env, services.workdir).start()]
        for n in range(args.workers):
            cmd = [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "--pool", "threads"]
            cmd += ["--concurrency", str(args.slots), "-Q", "conveyor", "--loglevel", "WARNING"]
            cmd += ["-n", f"bench-limits-{n}@%h"]
            children.append(Child(f"worker-{n}", cmd, env, services.workdir).start())
        expected = args.jobs * args.period / args.rpm
        timeout = args.timeout or expected * 2 + 120
        try:
            wait_until(
                lambda: (
                    sum(
                        v["jobs"]
                        for k, v in job_outcomes(services).items()
                        if k in ("succeeded", "failed", "canceled")
                    )
                    >= args.jobs
                ),
                timeout,
                "every job finished",
            )
        finally:
            for child in reversed(children):
                child.stop()
        elapsed = time.time() - began
        requests = sorted(sim.requests(), key=lambda item: item["at"])
        ok = [item["at"] for item in requests if item["outcome"] == "ok"]
        every = [item["at"] for item in requests]
        rejected = sum(1 for item in requests if item["outcome"] == "rate_limited")
        import redis

        client = redis.Redis.from_url(services.redis.url)
        provider = sim.base_url.split("//", 1)[1].split("/", 1)[0]
        stats = client.hgetall(f"conveyor:provider:{provider}/{MODEL}:stats")
        client.close()
        pauses = int(stats.get(b"pauses", 0))
        outcomes = job_outcomes(services)
    print(f"elapsed: {elapsed:.1f} s (the limit's ideal: {expected:.1f} s)")
    print(f"jobs: {json.dumps(outcomes, default=str)}")
    print(f"requests seen by the simulator: {len(every)} ({len(ok)} answered)")
    if every:
        # At the limit, the last of N requests can come no sooner than this after the first.
        floor = max(0, (len(ok) - 1) // args.rpm) * args.period
        print(
            f"first to last request: {every[-1] - every[0]:.1f} s "
            f"(at the limit, at least {floor:g} s)"
        )
    print(
        f"most requests in any {args.period:g} s window: {most_in_window(every, args.period)} "
        f"(answered ones: {most_in_window(ok, args.period)}; limit {args.rpm})"
    )
    print(f"429s from the simulator: {rejected}; pauses recorded: {pauses}")
    return 0


if __name__ == "__main__":
    run_main(main)
