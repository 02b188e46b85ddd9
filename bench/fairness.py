"""Fair dispatch: does a small tenant get through while a big one's backlog waits?

Issue 13's measure: tenant A submits 5,000 jobs at once, then tenant B submits 50. B's p95
wait from submit to start must stay within 2x its wait on an idle system plus one job's
duration, and A's throughput must stay >= 0.9x what it gets alone.

One worker process (`celery worker --pool threads --concurrency S -Q conveyor`) runs jobs
that each take D seconds in the model simulator (`[[sim duration=D tokens=T]]`). Jobs are
created through the real intake (`Jobs.create_job`, the group commit behind POST /jobs) from
threads of this process, which is the API's path without Flask's request handling, so that
5,000 submissions take seconds rather than competing with the worker for the two cores for a
minute. The window is the deployment's default, `auto` (S live slots + 25 %). Each run has
three phases, each with a fresh worker and empty tables and queues:

  idle   B submits 50 jobs to an idle system: B's waits (started_at - created_at);
  alone  A submits 5,000 jobs; A's jobs/s over [t, t + --measure], t = submit end + 1.5 D;
  mixed  as `alone`, and B submits 50 jobs at t: B's waits, and A's jobs/s over the same span.

With --baseline, two more phases repeat `alone` and `mixed` with CONVEYOR_TENANT_WINDOW=off
(every job published at submit, as before fair dispatch): the wait it replaces, and what the
windows cost A.

    python -m bench.fairness                 # 3 runs, S=100, D=2 s, ~5 min
    python -m bench.fairness --runs 1 --baseline
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    BIN,
    Child,
    Services,
    fmt,
    median,
    percentile,
    print_table,
    private_services,
    run_main,
    stop_on_sigterm,
)

A, B, WARMUP = "tenant-a", "tenant-b", "warm-up"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fairness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=100, help="S: the worker's concurrency")
    parser.add_argument("--duration", type=float, default=2.0, help="D: seconds per job")
    parser.add_argument("--tokens", type=int, default=10, help="tokens streamed per job")
    parser.add_argument("--backlog", type=int, default=5000, help="A's jobs")
    parser.add_argument("--small", type=int, default=50, help="B's jobs")
    parser.add_argument("--measure", type=float, default=20.0, help="seconds of A's throughput")
    parser.add_argument("--baseline", action="store_true", help="add phases with windows off")
    return parser.parse_args()


@dataclass
class Phase:
    name: str
    b_waits: list[float] = field(default_factory=list)
    a_rate: float | None = None
    a_held_peak: int = 0  # A's held jobs right after its submit
    a_outstanding: int = 0

    @property
    def b_p95(self) -> float | None:
        return percentile(self.b_waits, 95) if self.b_waits else None

    @property
    def b_p50(self) -> float | None:
        return percentile(self.b_waits, 50) if self.b_waits else None


@dataclass
class Bench:
    args: argparse.Namespace
    services: Services
    sim: Any
    app: Any
    pool: ThreadPoolExecutor

    def prompt(self, owner: str, n: int, duration: float | None = None) -> str:
        d = self.args.duration if duration is None else duration
        return f"[[sim duration={d:.3f} tokens={self.args.tokens}]] {owner} job {n}"

    def submit(self, owner: str, count: int, duration: float | None = None) -> float:
        """`count` jobs of `owner`, from 32 threads at once; returns when all are stored."""
        from app.runtime import runtime_of

        jobs = runtime_of(self.app).jobs

        def create(n: int) -> None:
            with self.app.app_context():
                prompt = self.prompt(owner, n, duration)
                jobs.create_job(owner=owner, kind="chat", input={"prompt": prompt})

        list(self.pool.map(create, range(count)))
        return time.time()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        import psycopg

        with psycopg.connect(self.services.pg.conninfo(), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def start_worker(self, name: str) -> Child:
        cmd = [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "--pool", "threads"]
        cmd += ["--concurrency", str(self.args.slots), "-Q", "conveyor", "--loglevel", "WARNING"]
        cmd += ["-n", f"{name}@%h"]
        env = self.services.env(OPENAI_BASE_URL=self.sim.base_url, OPENAI_API_KEY="sim")
        worker = Child(name, cmd, env, self.services.workdir).start()
        # Its first beat: the auto window is read from it.
        import redis

        client = redis.Redis.from_url(self.services.redis.url)
        try:
            deadline = time.monotonic() + 60
            while not client.hlen("conveyor:workers"):
                if time.monotonic() > deadline or not worker.alive():
                    raise RuntimeError(f"worker not beating:\n{worker.log_tail()}")
                time.sleep(0.1)
        finally:
            client.close()
        # Warm: every slot's thread, pooled connection and model client made before anything
        # is measured (a cold worker's first jobs wait seconds for them).
        self.submit(WARMUP, self.args.slots, duration=0.2)
        self.wait_done(WARMUP, self.args.slots, 60, finished=True)
        return worker

    def set_window(self, setting: str) -> None:
        from app.jobs.fairness import DispatchWindow
        from app.runtime import runtime_of

        rt = runtime_of(self.app)
        settings = rt.settings.model_copy(update={"tenant_window": setting})
        rt.intake.window = DispatchWindow(settings, rt.redis)

    def waits(self, owner: str) -> list[float]:
        rows = self.query(
            "SELECT extract(epoch FROM started_at - created_at) FROM jobs "
            "WHERE owner = %s AND started_at IS NOT NULL",
            (owner,),
        )
        return [float(row[0]) for row in rows]

    def finished_between(self, owner: str, begin: float, end: float) -> int:
        rows = self.query(
            "SELECT count(*) FROM jobs WHERE owner = %s AND status = 'succeeded' "
            "AND finished_at >= to_timestamp(%s) AND finished_at < to_timestamp(%s)",
            (owner, begin, end),
        )
        return int(rows[0][0])

    def counts(self, owner: str) -> tuple[int, int]:
        rows = self.query(
            "SELECT count(*) FILTER (WHERE status = 'queued' AND dispatched_at IS NULL), "
            "count(*) FILTER (WHERE status = 'running' OR "
            "(status = 'queued' AND dispatched_at IS NOT NULL)) FROM jobs WHERE owner = %s",
            (owner,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def wait_done(self, owner: str, count: int, timeout: float, finished: bool = False) -> None:
        """Until `count` jobs of `owner` have started (or `finished`)."""
        column = "finished_at" if finished else "started_at"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.query(
                f"SELECT count(*) FROM jobs WHERE owner = %s AND {column} IS NOT NULL", (owner,)
            )
            if rows[0][0] >= count:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{owner}'s jobs did not all start within {timeout:g} s")


def run_phase(bench: Bench, name: str, run: int) -> Phase:
    args = bench.args
    phase = Phase(name)
    bench.services.reset()
    bench.set_window("off" if name.endswith("-off") else "auto")
    worker = bench.start_worker(f"fair-{name}-{run}")
    try:
        if name == "idle":
            bench.submit(B, args.small)
            bench.wait_done(B, args.small, 60)
            phase.b_waits = bench.waits(B)
            return phase
        submitted = bench.submit(A, args.backlog)
        phase.a_held_peak, phase.a_outstanding = bench.counts(A)
        begin = submitted + 1.5 * args.duration
        time.sleep(max(0.0, begin - time.time()))
        if not name.startswith("alone"):
            bench.submit(B, args.small)
        end = begin + args.measure
        time.sleep(max(0.0, end - time.time()) + 1.0)  # finished_at lands within the second
        phase.a_rate = bench.finished_between(A, begin, end) / args.measure
        if not name.startswith("alone"):
            bench.wait_done(B, args.small, 300 if name.endswith("-off") else 60)
            phase.b_waits = bench.waits(B)
        return phase
    finally:
        # Killed, not stopped: a warm shutdown would wait for the running jobs.
        worker.stop(signal.SIGKILL)


def report(phases: list[Phase], args: argparse.Namespace) -> None:
    def of(name: str) -> list[Phase]:
        return [p for p in phases if p.name == name]

    rows = []
    for p in phases:
        rows.append(
            [
                p.name,
                fmt(p.b_p50, 2) if p.b_p50 is not None else "-",
                fmt(p.b_p95, 2) if p.b_p95 is not None else "-",
                fmt(p.a_rate, 1) if p.a_rate is not None else "-",
                p.a_outstanding or "-",
                p.a_held_peak or "-",
            ]
        )
    print_table(
        "phases (B waits in s, submit to start; A jobs/s over the measured span)",
        ["phase", "B p50", "B p95", "A jobs/s", "A published", "A held"],
        rows,
    )
    idle = median([p.b_p95 for p in of("idle") if p.b_p95 is not None])
    mixed_b = median([p.b_p95 for p in of("mixed") if p.b_p95 is not None])
    alone_a = median([p.a_rate for p in of("alone") if p.a_rate is not None])
    mixed_a = median([p.a_rate for p in of("mixed") if p.a_rate is not None])
    bound = 2 * idle + args.duration
    ratio = mixed_a / alone_a if alone_a else 0.0
    print(f"\nmedians of {args.runs} run(s), S={args.slots}, D={args.duration:g} s:")
    print(f"  B p95 wait idle {idle:.2f} s; with A's backlog {mixed_b:.2f} s;")
    print(f"  bound 2 x idle + D = {bound:.2f} s: {'PASS' if mixed_b <= bound else 'FAIL'}")
    print(
        f"  A jobs/s alone {alone_a:.1f}; with B {mixed_a:.1f}; ratio {ratio:.3f} (>= 0.9: ", end=""
    )
    print("PASS)" if ratio >= 0.9 else "FAIL)")
    base = [p.b_p95 for p in of("mixed-off") if p.b_p95 is not None]
    if base:
        alone_off = median([p.a_rate for p in of("alone-off") if p.a_rate is not None])
        print(f"  window off (before fair dispatch): B p95 wait {median(base):.2f} s;", end="")
        print(f" A jobs/s alone {alone_off:.1f} (windows cost A {1 - alone_a / alone_off:.1%})")


def main() -> int:
    from devtools.simprocess import SimulatorProcess

    args = parse_args()
    stop_on_sigterm()
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    began = time.monotonic()
    phases: list[Phase] = []
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(private_services())
        sim = stack.enter_context(SimulatorProcess())
        from app import create_app

        app = create_app(services.settings(openai_api_key="sim", openai_base_url=sim.base_url))
        pool = stack.enter_context(ThreadPoolExecutor(32))
        bench = Bench(args, services, sim, app, pool)
        print(f"services and simulator ready in {time.monotonic() - began:.1f} s", flush=True)
        names = ["idle", "alone", "mixed"] + (["alone-off", "mixed-off"] if args.baseline else [])
        for run in range(1, args.runs + 1):
            for name in names:
                phase = run_phase(bench, name, run)
                phases.append(phase)
                print(
                    f"run {run} {name}: B p95 {fmt(phase.b_p95, 2) if phase.b_p95 else '-'} s, "
                    f"A {fmt(phase.a_rate, 1) if phase.a_rate else '-'} jobs/s, "
                    f"A published {phase.a_outstanding} held {phase.a_held_peak}",
                    flush=True,
                )
        report(phases, args)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
