"""Worker CPU per job: Conveyor's worker against a bare Celery task doing the same model call.

Both peers run the same way in the same run: one `celery worker --pool P --concurrency S`
process on the same private Redis (the broker) and PostgreSQL, every job streaming the same
answer of T tokens from the same simulator over D seconds (`[[sim tokens=T duration=D]]`).

  conveyor  `celery -A workers.celery_app` (the Procfile's worker), chat jobs made with
            Jobs.create_job() in two creator processes: claim, lease, events, deltas, the
            model call through the openai client, model_calls, finish
  bare      `celery -A bench.bare` (bench/bare.py): the message carries a row id and the
            prompt; the task streams with httpx, parses the SSE lines itself and writes the
            text with one UPDATE

A measurement: the worker starts and is left until its CPU time stops moving (imports and
connections done), then its idle CPU rate is read for --idle seconds; N jobs are submitted
(Conveyor's by the creators, the bare ones by this process) and the worker's CPU time is read
again when the last has finished. ms per job = (CPU used - idle rate x elapsed) / N, from
/proc (the worker process and any children). The two peers alternate which goes first, run by
run; medians of --runs are printed with their ratio (target: conveyor <= 1.2 x bare), and
Redis commands and PostgreSQL transactions per job for both.

    python -m bench.cpu                          # 20 and 200 tokens, 3 runs each, ~4 minutes
    python -m bench.cpu --tokens 200 --runs 1 --jobs 200
    python -m bench.cpu --profile                # py-spy of each peer's first measurement
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import concurrency
from bench.common import (
    BIN,
    RESULTS,
    Child,
    Profile,
    Services,
    have_pyspy,
    median,
    print_table,
    read_counters,
    run_main,
    start_pyspy,
    stop_on_sigterm,
    tree_cpu_seconds,
)
from bench.concurrency import TX_RULES, WORKER_RULES
from devtools.processes import proc_stat

OWNER = "bench-cpu"
MODEL = "gpt-4o-mini"
TARGET = 1.2
PEERS = ("conveyor", "bare")
PROFILE_RATE = 250
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SETTLED_CPU = 0.02  # CPU seconds per second under which a starting worker counts as idle


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokens", default="20,200", help="answer lengths T, e.g. 20,200")
    parser.add_argument("--jobs", type=int, default=400, help="N jobs per measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pool", default="gevent", choices=("gevent", "threads"))
    parser.add_argument("--concurrency", type=int, default=50, help="S slots of each worker")
    parser.add_argument("--duration", type=float, default=1.0, help="D: seconds per answer")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU read")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Conveyor worker env, e.g. CONVEYOR_DELTA_FLUSH_INTERVAL=0.25",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy each peer's first run")
    parser.add_argument("--profile-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    return args


@dataclass
class Measurement:
    peer: str
    tokens: int
    run: int
    cpu_ms_per_job: float = float("nan")
    sys_share: float = float("nan")  # of the CPU used, the kernel's (system calls: network I/O)
    idle_cpu_pct: float = float("nan")
    seconds: float = float("nan")
    redis_per_job: float = float("nan")
    pg_xacts_per_job: float = float("nan")
    error: str | None = None
    top_redis: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    args: argparse.Namespace
    services: Services
    sim: Any
    creators: ProcessPoolExecutor

    def prompt(self, tokens: int) -> str:
        return f"[[sim tokens={tokens} duration={self.args.duration:g}]] Write a short note."

    def env(self, peer: str) -> dict[str, str]:
        extra = dict(kv.split("=", 1) for kv in self.args.env) if peer == "conveyor" else {}
        return self.services.env(
            OPENAI_BASE_URL=self.sim.base_url,
            OPENAI_API_KEY="sim",
            BARE_CONNINFO=self.services.pg.conninfo(),
            **extra,
        )

    def start_worker(self, peer: str, name: str) -> Child:
        app, queue = (
            ("workers.celery_app", "conveyor") if peer == "conveyor" else ("bench.bare", "bare")
        )
        cmd = [str(BIN / "celery"), "-A", app, "worker", "--pool", self.args.pool]
        cmd += ["--concurrency", str(self.args.concurrency), "-Q", queue]
        cmd += ["--loglevel", "WARNING", "-n", f"{name}@%h", "--without-mingle", "--without-gossip"]
        return Child(name, cmd, self.env(peer), self.services.workdir).start()


# One measurement --------------------------------------------------------------------------


def settle(worker: Child, timeout: float = 60) -> None:
    """Waits until the worker's CPU time stops moving: started, connected, idle."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(worker.pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not worker.alive():
            raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
        now = tree_cpu_seconds(worker.pid)
        if now - last < SETTLED_CPU * 0.5:
            return
        last = now
    raise RuntimeError(f"{worker.name} still busy after {timeout:g} s:\n{worker.log_tail()}")


def system_seconds(pid: int) -> float:
    """Kernel CPU time of a process (stime), its reaped children's included."""
    fields = proc_stat(pid)
    return 0.0 if fields is None else (int(fields[12]) + int(fields[14])) / CLOCK_TICKS


def idle_rate(worker: Child, seconds: float) -> float:
    before, began = tree_cpu_seconds(worker.pid), time.monotonic()
    time.sleep(seconds)
    return (tree_cpu_seconds(worker.pid) - before) / (time.monotonic() - began)


def query_one(bench: Bench, sql: str, params: tuple[Any, ...] = ()) -> Any:
    import psycopg

    with psycopg.connect(bench.services.pg.conninfo(), autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def wait_done(bench: Bench, worker: Child, sql: str, jobs: int) -> None:
    # Generous: N jobs of D seconds over S slots, times ten, plus a minute.
    timeout = 10 * bench.args.duration * jobs / bench.args.concurrency + 60
    deadline = time.monotonic() + timeout
    while query_one(bench, sql) < jobs:
        if not worker.alive():
            raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{jobs} jobs not done within {timeout:.0f} s")
        time.sleep(0.1)


def submit_conveyor(bench: Bench, tokens: int) -> None:
    prompts = [bench.prompt(tokens)] * bench.args.jobs
    parts = [prompts[i :: concurrency.CREATORS] for i in range(concurrency.CREATORS)]
    for future in [bench.creators.submit(concurrency.create_batch, OWNER, p) for p in parts]:
        future.result()


def submit_bare(bench: Bench, tokens: int) -> None:
    from bench import bare

    bare.app.conf.broker_url = bench.services.redis.url
    prompt = bench.prompt(tokens)
    with bare.app.producer_or_acquire() as producer:
        for row_id in range(bench.args.jobs):
            bare.chat.apply_async((row_id, prompt, MODEL), producer=producer)


def prepare_bare(bench: Bench) -> None:
    import psycopg

    from bench.bare import TABLE

    with psycopg.connect(bench.services.pg.conninfo(), autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, text text, done bool)"
        )
        conn.execute(f"TRUNCATE {TABLE}")
        conn.execute(
            f"INSERT INTO {TABLE} SELECT i, NULL, false FROM generate_series(0, %s) i",
            (bench.args.jobs - 1,),
        )


DONE_SQL = {
    "conveyor": "SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL",
    "bare": "SELECT count(*) FROM bare_results WHERE done",
}


def measure(bench: Bench, peer: str, tokens: int, run: int, profile: bool) -> Measurement:
    result = Measurement(peer, tokens, run)
    bench.services.reset()
    if peer == "bare":
        prepare_bare(bench)
    worker = bench.start_worker(peer, f"cpu-{peer}-{tokens}-{run}")
    try:
        settle(worker)
        idle = idle_rate(worker, bench.args.idle)
        counters, cpu, began = (
            read_counters(bench.services),
            tree_cpu_seconds(worker.pid),
            time.monotonic(),
        )
        kernel = system_seconds(worker.pid)
        profiler = start_profile(bench, worker, peer, tokens) if profile else None
        (submit_conveyor if peer == "conveyor" else submit_bare)(bench, tokens)
        wait_done(bench, worker, DONE_SQL[peer], bench.args.jobs)
        used, elapsed = tree_cpu_seconds(worker.pid) - cpu, time.monotonic() - began
        result.sys_share = (system_seconds(worker.pid) - kernel) / used if used else float("nan")
        after = read_counters(bench.services)
        if profiler is not None:
            # Stopped when the jobs are done (py-spy writes its file on SIGINT), so that its
            # samples are those of exactly these N jobs.
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        if peer == "conveyor":
            result.error = check_conveyor(bench)
    except RuntimeError as exc:
        result.error = str(exc)
        return result
    finally:
        worker.stop()
    jobs = bench.args.jobs
    result.cpu_ms_per_job = 1000 * (used - idle * elapsed) / jobs
    result.idle_cpu_pct, result.seconds = 100 * idle, elapsed
    redis_delta = {k: after.redis[k] - counters.redis.get(k, 0) for k in after.redis}
    redis_delta = {k: v for k, v in redis_delta.items() if v > 0 and k not in ("info", "llen")}
    result.redis_per_job = sum(redis_delta.values()) / jobs
    result.top_redis = {
        k: v / jobs for k, v in sorted(redis_delta.items(), key=lambda kv: -kv[1])[:6]
    }
    # Less this benchmark's own polling: one transaction per 0.1 s (approximate, as the
    # statistics PostgreSQL publishes about once a second).
    result.pg_xacts_per_job = (after.pg_xacts - counters.pg_xacts - elapsed / 0.1) / jobs
    return result


def check_conveyor(bench: Bench) -> str | None:
    bad = query_one(bench, "SELECT count(*) FROM jobs WHERE status <> 'succeeded' OR attempt <> 1")
    return f"{bad} jobs not succeeded at their first attempt" if bad else None


def start_profile(bench: Bench, worker: Child, peer: str, tokens: int) -> Any:
    if not have_pyspy():
        print("(no profile: `.venv/bin/pip install py-spy`)")
        return None
    seconds = 600  # stopped when the jobs are done
    out = bench.args.profile_dir / f"cpu-{peer}-{tokens}.txt"
    bench.args.profile_dir.mkdir(parents=True, exist_ok=True)
    (bench.args.profile_dir / ".gitignore").write_text("*\n")
    print(f"  py-spy on the {peer} worker -> {out}")
    return start_pyspy(worker.pid, out, seconds, mode="gil", rate=PROFILE_RATE)


def print_profile(args: argparse.Namespace, tokens: int) -> None:
    """Each peer's samples by category: the bare task's are the floor that Celery, gevent, the
    HTTP client and the SSE parsing cost; what Conveyor has beyond them is its own."""
    loaded = {p: Profile.load([args.profile_dir / f"cpu-{p}-{tokens}.txt"]) for p in PEERS}
    if not all(profile.total() for profile in loaded.values()):
        print(f"(no samples in {args.profile_dir} for {tokens} tokens)")
        return
    per_job = {p: 1000 / PROFILE_RATE * 1 / args.jobs for p in PEERS}
    counts = {p: {n: c for n, c, _ in loaded[p].breakdown(WORKER_RULES)} for p in PEERS}
    names = sorted(
        set(counts["conveyor"]) | set(counts["bare"]), key=lambda n: -counts["conveyor"].get(n, 0)
    )
    rows = [[n, *(f"{counts[p].get(n, 0) * per_job[p]:.2f}" for p in PEERS)] for n in names]
    rows.append(["total (GIL held)", *(f"{loaded[p].total() * per_job[p]:.2f}" for p in PEERS)])
    print_table(
        f"{tokens} tokens: GIL-holding CPU per job by category, ms (py-spy at {PROFILE_RATE} Hz)",
        ["category", *PEERS],
        rows,
    )
    inside = loaded["conveyor"].breakdown(TX_RULES, "transitions.py")
    rows = [[n, f"{share:.1f}", count] for n, count, share in inside]
    print_table(
        "Conveyor, inside the state changes (transitions.py)", ["category", "%", "samples"], rows
    )


# Report -----------------------------------------------------------------------------------


def report(results: list[Measurement], args: argparse.Namespace) -> None:
    rows = []
    for tokens in args.tokens:
        by_peer = {
            peer: [r for r in results if r.peer == peer and r.tokens == tokens and not r.error]
            for peer in ("conveyor", "bare")
        }
        ms = {peer: median([r.cpu_ms_per_job for r in rs]) for peer, rs in by_peer.items()}
        ratio = ms["conveyor"] / ms["bare"] if ms["bare"] else float("nan")
        ratios = [
            c.cpu_ms_per_job / b.cpu_ms_per_job
            for c, b in zip(by_peer["conveyor"], by_peer["bare"], strict=False)
            if b.cpu_ms_per_job
        ]
        verdict = "met" if ratio <= TARGET else "MISSED"
        rows.append(
            [
                tokens,
                f"{ms['conveyor']:.2f}",
                f"{ms['bare']:.2f}",
                f"{ratio:.2f} ({verdict})",
                " ".join(f"{r:.2f}" for r in ratios),
                f"{median([r.redis_per_job for r in by_peer['conveyor']]):.1f} / "
                f"{median([r.redis_per_job for r in by_peer['bare']]):.1f}",
                f"{median([r.pg_xacts_per_job for r in by_peer['conveyor']]):.1f} / "
                f"{median([r.pg_xacts_per_job for r in by_peer['bare']]):.1f}",
            ]
        )
    print_table(
        f"Worker CPU per job, --pool {args.pool} --concurrency {args.concurrency}, "
        f"{args.jobs} jobs of {args.duration:g} s, medians of {args.runs} "
        f"(target: conveyor <= {TARGET} x bare)",
        [
            "tokens",
            "conveyor ms/job",
            "bare ms/job",
            "ratio",
            "ratio by run",
            "Redis cmds/job (c / b)",
            "PG xacts/job (c / b)",
        ],
        rows,
    )
    for r in results:
        if r.peer == "conveyor" and r.top_redis and r.run == 1:
            top = ", ".join(f"{k} {v:.1f}" for k, v in r.top_redis.items())
            print(f"  conveyor, {r.tokens} tokens: Redis commands per job: {top}")


def progress_line(r: Measurement) -> str:
    if r.error:
        return f"run {r.run} {r.peer:<8} T={r.tokens:<4} ERROR {r.error.splitlines()[0]}"
    return (
        f"run {r.run} {r.peer:<8} T={r.tokens:<4} {r.cpu_ms_per_job:6.2f} ms/job  "
        f"kernel {100 * r.sys_share:3.0f}%  idle {r.idle_cpu_pct:4.1f}%  {r.seconds:5.1f} s  "
        f"Redis {r.redis_per_job:5.1f}/job  PG {r.pg_xacts_per_job:4.1f} xacts/job"
    )


# Main -------------------------------------------------------------------------------------


def main() -> int:

    args = parse_args()
    stop_on_sigterm()
    os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
    began = time.monotonic()
    results: list[Measurement] = []
    with contextlib.ExitStack() as stack:
        services, sim, creators = stack.enter_context(concurrency.services_with_creators())
        bench = Bench(args, services, sim, creators)
        print(f"services and simulator ready in {time.monotonic() - began:.1f} s", flush=True)
        profiled: set[str] = set()
        for run in range(1, args.runs + 1):
            for tokens in args.tokens:
                # Alternate which peer goes first: neither is always measured on a warmer
                # machine.
                order = ("conveyor", "bare") if run % 2 else ("bare", "conveyor")
                for peer in order:
                    profile = args.profile and peer not in profiled
                    if profile:
                        profiled.add(peer)
                    result = measure(bench, peer, tokens, run, profile)
                    results.append(result)
                    print(progress_line(result), flush=True)
        report(results, args)
        if args.profile:
            print_profile(args, args.tokens[0])
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
