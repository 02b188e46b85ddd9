"""Plumbing shared by the benchmarks: private services, child processes, /proc accounting,
py-spy profiles, statistics and result tables."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from devtools.postgres import PostgresServer
from devtools.processes import proc_stat
from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
SECRET_KEY = "bench-secret"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child side of Popen must not import or allocate.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


# Services ---------------------------------------------------------------------------------


@dataclass
class Services:
    """The private PostgreSQL and Redis of one benchmark run."""

    pg: PostgresServer
    redis: RedisServer
    workdir: Path

    def settings(self, **overrides: Any) -> Any:
        from app.config import Settings

        values = {
            "database_url": self.pg.url,
            "redis_url": self.redis.url,
            "secret_key": SECRET_KEY,
            **overrides,
        }
        return Settings(**values)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a child process: the private services, nothing inherited that could
        point it elsewhere (a developer's CONVEYOR_* or DATABASE_URL)."""
        blocked = ("CONVEYOR_", "DATABASE_URL", "REDIS_URL", "BROKER_URL", "OPENAI_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(blocked)}
        env.update(
            DATABASE_URL=self.pg.url,
            REDIS_URL=self.redis.url,
            CONVEYOR_SECRET_KEY=SECRET_KEY,
            CONVEYOR_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def reset(self) -> None:
        """Empty the job tables, the task queues, kombu's unacked set (a killed worker leaves
        it behind) and the event streams, so that every phase starts from the same state.
        Never FLUSHDB: kombu keeps its queue bindings in Redis and a publisher that already
        declared them would then silently drop messages."""
        import psycopg
        import redis

        with psycopg.connect(self.pg.conninfo(), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            conn.execute("TRUNCATE jobs, batches CASCADE")
        client = redis.Redis.from_url(self.redis.url)
        try:
            keys = [k for p in ("conveyor*", "unacked*") for k in client.scan_iter(p, count=5000)]
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])
        finally:
            client.close()


@contextlib.contextmanager
def private_services() -> Iterator[Services]:
    """PostgreSQL (non-durable) and Redis on free ports, migrated; stopped on the way out."""
    from app.migrate import upgrade

    with (
        tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        pg = stack.enter_context(PostgresServer(workdir / "pg", durable=False))
        rs = stack.enter_context(RedisServer())
        upgrade(pg.url)
        yield Services(pg, rs, workdir)


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops what the run started."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


@dataclass(frozen=True)
class Counters:
    """Cumulative Redis command calls and PostgreSQL transactions, read at both ends of a
    measurement. PostgreSQL publishes a busy backend's counts about once a second, so a
    difference over a few seconds is approximate."""

    redis: Counter[str]
    pg_xacts: int

    def redis_total(self) -> int:
        return sum(n for cmd, n in self.redis.items() if cmd not in ("info", "llen"))


def read_counters(services: Services) -> Counters:
    import psycopg
    import redis

    client = redis.Redis.from_url(services.redis.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = Counter({name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()})
    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return Counters(calls, int(row[0]) if row else 0)


# Child processes --------------------------------------------------------------------------


def _die_with_parent() -> None:
    # If the benchmark is killed outright, its servers must not outlive it.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A subprocess this benchmark started, logging to a file, stopped by its pid only."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.cmd = list(cmd)
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Child:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl, no locks
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_main(main: Callable[[], int]) -> None:
    """A benchmark's entry point: its exit code, and 130 on Ctrl-C after its cleanup ran."""
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything this run started has been stopped")
        raise SystemExit(130) from None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def sleep_until(wall_time: float) -> None:
    delay = wall_time - time.time()
    if delay > 0:
        time.sleep(delay)


# /proc accounting -------------------------------------------------------------------------


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """utime+stime of a live process (all threads); with `reaped`, plus its waited-for
    children's, so CPU of short-lived children (PostgreSQL backends) is not lost."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def _parents() -> dict[int, int]:
    result = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is not None:
                result[int(entry.name)] = int(fields[1])
    return result


def descendants(pid: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, ppid in parents.items() if ppid == parent]
        found += kids
        frontier += kids
    return found


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p, reaped=True) for p in [pid, *descendants(pid)])


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    total = sum(values)
    idle = values[3] + values[4]  # idle + iowait
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def status_kb(pid: int, key: str) -> int | None:
    """A /proc/<pid>/status field in kB (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    by_name: dict[str, float]
    machine_busy: float
    machine_total: float


class CpuMeter:
    """CPU used between two snapshots by named process trees and by the whole machine."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots

    def snapshot(self) -> CpuSnapshot:
        by_name = {name: tree_cpu_seconds(pid) for name, pid in self.roots.items()}
        busy, total = machine_cpu()
        return CpuSnapshot(time.time(), by_name, busy, total)

    @staticmethod
    def usage(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
        """Percent of one core per tree, and `machine` in percent of all cores."""
        wall = max(1e-9, after.at - before.at)
        usage = {
            name: 100 * (after.by_name[name] - before.by_name[name]) / wall
            for name in before.by_name
        }
        total = max(1e-9, after.machine_total - before.machine_total)
        usage["machine"] = 100 * (after.machine_busy - before.machine_busy) / total
        return usage


# py-spy -----------------------------------------------------------------------------------


def start_pyspy(pid: int, out: Path, seconds: float, *, mode: str, rate: int = 50) -> Any:
    """py-spy in non-blocking mode (it never pauses the target), collapsed-stack output.
    mode "gil": only the thread holding the GIL, i.e. where the process's Python CPU goes
    (the GIL is what a busy Python process runs out of first). mode "wall": every thread, idle
    ones included, i.e. where wall time goes, waits on sockets and locks included."""
    cmd = [str(pyspy_path()), "record", "--pid", str(pid), "--format", "raw"]
    cmd += ["--output", str(out), "--duration", str(round(seconds)), "--rate", str(rate)]
    cmd += ["--nonblocking", "--gil" if mode == "gil" else "--idle"]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl, no locks
    )


def pyspy_path() -> Path | None:
    """The virtualenv's py-spy, else one on PATH (e.g. installed with `pip install --target`
    outside a shared virtualenv)."""
    if (BIN / "py-spy").exists():
        return BIN / "py-spy"
    found = shutil.which("py-spy")
    return Path(found) if found else None


def have_pyspy() -> bool:
    return pyspy_path() is not None


# A rule: a category and its patterns; a pattern is substrings that must all occur in one
# frame ("func (file.py:line)" as py-spy prints it).
Rule = tuple[str, Sequence[tuple[str, ...]]]


class Profile:
    """Collapsed stacks (root first, `;`-separated) with their sample counts."""

    def __init__(self, stacks: Counter[str]) -> None:
        self.stacks = stacks

    @classmethod
    def load(cls, paths: Sequence[Path]) -> Profile:
        stacks: Counter[str] = Counter()
        for path in paths:
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    stacks[stack] += int(count)
        return cls(stacks)

    def total(self, within: str | None = None) -> int:
        return sum(n for stack, n in self.stacks.items() if within is None or within in stack)

    def breakdown(
        self, rules: Sequence[Rule], within: str | None = None
    ) -> list[tuple[str, int, float]]:
        """Samples per category: a stack goes to the first rule (in order) that matches any of
        its frames, so put specific rules (a publish inside create_job) before broad ones."""
        counts: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            if within is None or within in stack:
                counts[_categorize(stack.split(";"), rules)] += n
        total = max(1, sum(counts.values()))
        return [(name, n, 100 * n / total) for name, n in counts.most_common()]

    def top_functions(self, count: int, within: str | None = None) -> list[tuple[str, float]]:
        """Leaf functions by share of samples (self time)."""
        leaves: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            if within is None or within in stack:
                leaves[stack.rsplit(";", 1)[-1]] += n
        total = max(1, sum(leaves.values()))
        return [(frame, 100 * n / total) for frame, n in leaves.most_common(count)]


def _categorize(frames: list[str], rules: Sequence[Rule]) -> str:
    for name, patterns in rules:
        for pattern in patterns:
            if any(all(part in frame for part in pattern) for frame in frames):
                return name
    return "other"


# Statistics and tables --------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; `values` need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers], *[[fmt(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        # First column (labels) left-aligned, numbers right-aligned.
        numbers = zip(row[1:], widths[1:], strict=True)
        line = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in numbers]
        print("  " + "  ".join(line))
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def answers_live(url: str, server: Child) -> bool:
    """Whether the gunicorn `server` at `url` answers GET /api/v1/live (raises if it exited)."""
    import urllib.request

    if not server.alive():
        raise RuntimeError(f"gunicorn exited:\n{server.log_tail()}")
    try:
        with urllib.request.urlopen(f"{url}/api/v1/live", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


# Rate limits no benchmark load reaches: the figures are the server's, not the limiter's.
UNREACHED_LIMITS = {
    f"CONVEYOR_RATE_LIMIT_{tier}": "100000000/minute" for tier in ("CREATE", "READ", "STREAM")
}


def start_web(services: Services, env: dict[str, str], workers: int) -> tuple[Child, str]:
    """gunicorn as the Procfile's `web` runs it (gevent, its settings file), on a free port,
    once every worker has booted."""
    from devtools.processes import free_port

    port = free_port()
    cmd = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--worker-class", "gevent"]
    cmd += ["--workers", str(workers), "--worker-connections", "1000"]
    cmd += ["--graceful-timeout", "20", "-c", "python:app.gunicorn_config", "app:create_app()"]
    server = Child("gunicorn", cmd, env, services.workdir).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_live(url, server), 60, "gunicorn answering /api/v1/live")
        # Every worker must have booted, or the first phase measures one of them.
        wait_until(lambda: len(descendants(server.pid)) >= workers, 30, "gunicorn workers")
    except TimeoutError:
        print(server.log_tail())
        raise
    return server, url


def create_key(settings: Any, owner: str) -> str:
    """An API key for `owner`, made through the app as an operator's tooling makes one."""
    return create_keys(settings, [owner])[owner]


def create_keys(settings: Any, owners: Sequence[str]) -> dict[str, str]:
    """An API key for each of `owners`, by one app."""
    from app import create_app
    from app.keys.api_keys import create_api_key
    from app.runtime import runtime

    app = create_app(settings)
    with app.app_context():
        keys = {owner: create_api_key(runtime().db, owner, "bench") for owner in owners}
    app.extensions["conveyor"].db.dispose()
    return keys
