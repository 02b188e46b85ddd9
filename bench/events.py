"""Latency of job events from a worker's emit to a subscribed Socket.IO client, next to a raw
Redis PUBLISH -> SUBSCRIBE round trip measured in the same run, and one web process holding many
subscribed clients.

  raw     a publisher process PUBLISHes timestamped messages at --rate per second on the same
          Redis; a redis-py subscriber here receives them
  socket  an emitter process publishes `job.output.delta` events at --rate per second through
          the app's own EventBus, exactly as a worker does (its group commit, the Lua script
          that appends to the job's stream and publishes on the Socket.IO channel); the web
          process (gunicorn, gevent worker, as in the Procfile) relays them; a python-socketio
          client here, subscribed to the job over a WebSocket, receives them
  fanout  --clients python-socketio AsyncClients, spread over --client-procs processes (so the
          client side is not what is measured), connect to ONE web process; each subscribes to
          --subscriptions of --fanout-jobs running jobs; the emitter sends --fanout-rate events
          per second through the EventBus, round-robin over the jobs, in --runs windows of
          --fanout-seconds; delivered / expected, latency, the web process's CPU time per
          1,000 events delivered (from /proc) and its RSS before and after the clients
          connected

Latency is the receiver's clock minus the timestamp the sender put in the message (one machine,
one clock). Both peers run the same number of messages at the same rate, interleaved over
--runs runs; medians over runs are printed.

    python -m bench.events                       # about two minutes
    python -m bench.events --runs 1 --clients 200
    python -m bench.events --fanout-only --profile   # py-spy of the web process, last window
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BIN,
    RESULTS,
    Child,
    Profile,
    Rule,
    Services,
    cpu_seconds,
    have_pyspy,
    machine_cpu,
    median,
    print_table,
    private_services,
    run_main,
    start_pyspy,
    status_kb,
    stop_on_sigterm,
)

RAW_CHANNEL = "bench-raw"
OWNER = "bench-events"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=int, default=1000, help="events per second (raw, socket)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1000, help="fanout: subscribed clients")
    parser.add_argument(
        "--client-procs", type=int, default=4, help="fanout: processes the clients spread over"
    )
    parser.add_argument("--fanout-jobs", type=int, default=10, help="fanout: jobs watched")
    parser.add_argument(
        "--subscriptions", type=int, default=2, help="fanout: jobs each client subscribes to"
    )
    parser.add_argument(
        "--fanout-rate", type=float, default=50, help="fanout: events per second, all jobs"
    )
    parser.add_argument("--fanout-seconds", type=float, default=10.0)
    parser.add_argument("--fanout-only", action="store_true", help="skip the raw/socket phases")
    parser.add_argument(
        "--web-workers", type=int, default=1, help="gunicorn workers (the Procfile runs 2)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the web process in the last fanout window"
    )
    parser.add_argument("--profile-dir", type=Path, default=RESULTS)
    return parser.parse_args()


# Senders (child processes) --------------------------------------------------------------------


def paced(rate: float, count: int) -> Any:
    """Yields i at i / rate seconds from now, catching up rather than drifting."""
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i


def publish_raw(redis_url: str, rate: int, count: int) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for i in paced(rate, count):
        client.publish(RAW_CHANNEL, json.dumps({"i": i, "t": time.time()}))


def emit_deltas(
    env: dict[str, str], jobs: list[tuple[str, str, int]], rate: float, count: int
) -> None:
    """What a worker does for each coalesced delta: EventBus.publish_later. Event i goes to
    job i % len(jobs) (each given as job id, owner, its first seq to send)."""
    os.environ.update(env)
    from app import create_app
    from app.jobs.events import Event
    from app.jobs.payloads import OutputDeltaPayload
    from app.runtime import runtime

    app = create_app()
    with app.app_context():
        bus = runtime().bus
        seqs = [first_seq for _job_id, _owner, first_seq in jobs]
        for i in paced(rate, count):
            job_id, owner, _first = jobs[i % len(jobs)]
            seq, seqs[i % len(jobs)] = seqs[i % len(jobs)], seqs[i % len(jobs)] + 1
            # Each delta's text is its send time: the receivers count distinct ones.
            delta = OutputDeltaPayload(text=repr(time.time()), progress=0.0)
            event = Event(uuid.UUID(job_id), owner, seq, delta)
            bus.publish_later([event], on_refused=lambda _event: None)
        # The last batch is on the publisher thread: a durable call waits behind it.
        bus.publish([])
        time.sleep(0.5)


def start_sender(target: Any, *args: Any) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


# Receivers -------------------------------------------------------------------------------------


@dataclass
class Received:
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent_at: float) -> None:
        latency = (time.time() - sent_at) * 1000
        with self.lock:
            self.latencies_ms.append(latency)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Phase:
    name: str
    sent: int
    received: int
    p50: float
    p99: float
    max: float


def phase_of(name: str, sent: int, received: Received) -> Phase:
    values = received.latencies_ms
    return Phase(
        name, sent, len(values), percentile(values, 0.5), percentile(values, 0.99), max(values)
    )


def run_raw(services: Services, rate: int, count: int) -> Phase:
    import redis

    received = Received()
    client = redis.Redis.from_url(services.redis.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(RAW_CHANNEL)
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                received.add(json.loads(message["data"])["t"])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    sender = start_sender(publish_raw, services.redis.url, rate, count)
    sender.join()
    time.sleep(0.5)
    done.set()
    listener.join()
    pubsub.close()
    client.close()
    return phase_of("raw Redis PUBLISH -> SUBSCRIBE", count, received)


@dataclass
class Target:
    """A queued job (no worker runs) whose feed the senders extend."""

    job_id: str
    owner: str
    key: str
    next_seq: int


def new_targets(services: Services, count: int) -> list[Target]:
    """`count` jobs of one owner, marked running as a worker's claim would (no worker runs:
    the senders play its part)."""
    import psycopg

    from app import create_app
    from app.keys.api_keys import create_api_key
    from app.runtime import runtime

    app = create_app(services.settings())
    with app.app_context():
        key = create_api_key(runtime().db, OWNER, "bench")
        jobs = [
            runtime().jobs.create_job(owner=OWNER, kind="chat", input={"prompt": "events"}).job
            for _ in range(count)
        ]
        app.extensions["conveyor"].db.dispose()
    with psycopg.connect(services.pg.conninfo(), autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET status = 'running', attempt = 1, started_at = now(), "
            "lease_expires_at = now() + interval '1 hour' WHERE id = ANY(%s)",
            ([job.id for job in jobs],),
        )
    return [Target(str(job.id), OWNER, key, 2) for job in jobs]


def run_socket(services: Services, web_url: str, target: Target, rate: int, count: int) -> Phase:
    import socketio

    received = Received()
    client = socketio.Client(reconnection=False)
    client.on("job_event", lambda event: received.add(float(event["data"]["text"])))
    client.connect(web_url, auth={"api_key": target.key}, transports=["websocket"], wait_timeout=10)
    ack = client.call(
        "subscribe", {"job_id": target.job_id, "after_seq": target.next_seq - 1}, timeout=10
    )
    assert ack["ok"], ack
    env = services.env()
    sender = start_sender(
        emit_deltas, env, [(target.job_id, target.owner, target.next_seq)], rate, count
    )
    sender.join()
    target.next_seq += count
    time.sleep(1.0)
    client.disconnect()
    return phase_of("worker emit -> Socket.IO client", count, received)


@dataclass
class Fanout:
    run: int
    clients: int
    connected: int
    sent: int
    expected: int
    delivered: int
    p50: float
    p99: float
    max: float
    web_cpu_s: float  # the web process's CPU time from the first emit to the end of delivery
    clients_cpu_pct: float  # the client processes' CPU, in % of one core, over that time
    machine_pct: float
    rss_before_mb: float
    rss_after_mb: float

    @property
    def kb_per_client(self) -> float:
        return (self.rss_after_mb - self.rss_before_mb) * 1024 / max(1, self.connected)

    @property
    def cpu_ms_per_1000(self) -> float:
        return 1e6 * self.web_cpu_s / max(1, self.delivered)


def subscriptions(clients: int, jobs: list[Target], per_client: int) -> list[list[Target]]:
    """Client c watches jobs c, c+1, ... (mod the number of jobs): every job has the same
    number of subscribers, and no two of a client's jobs are the same."""
    per_client = min(per_client, len(jobs))
    return [[jobs[(c + k) % len(jobs)] for k in range(per_client)] for c in range(clients)]


def fanout_clients(
    web_url: str,
    plans: list[list[tuple[str, str, int]]],
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    """A client process: one python-socketio AsyncClient per plan (its (job id, key, after)
    subscriptions); puts (index of this process's first client, subscriptions acknowledged per
    job, connected count) on `ready`, then, once `stop` is set, (CPU seconds, [(sent_at,
    latency_ms)]) on `results`."""
    results.put(asyncio.run(_fanout_clients(web_url, plans, ready, stop)))


async def _fanout_clients(
    web_url: str, plans: list[list[tuple[str, str, int]]], ready: Any, stop: Any
) -> tuple[float, list[tuple[float, float]]]:
    import socketio

    received: list[tuple[float, float]] = []
    connected: list[Any] = []
    acked: dict[str, int] = {}

    def on_event(event: dict[str, Any]) -> None:
        sent_at = float(event["data"]["text"])
        received.append((sent_at, (time.time() - sent_at) * 1000))

    async def one(plan: list[tuple[str, str, int]]) -> None:
        client = socketio.AsyncClient(reconnection=False)
        client.on("job_event", on_event)
        await client.connect(
            web_url, auth={"api_key": plan[0][1]}, transports=["websocket"], wait_timeout=30
        )
        connected.append(client)
        for job_id, _key, after in plan:
            ack = await client.call("subscribe", {"job_id": job_id, "after_seq": after}, timeout=30)
            if ack.get("ok"):
                acked[job_id] = acked.get(job_id, 0) + 1

    for start in range(0, len(plans), 50):  # in waves, so the listen backlog is not overrun
        outcomes = await asyncio.gather(
            *(one(plan) for plan in plans[start : start + 50]), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                print(f"  a client failed to connect: {outcome!r}", flush=True)
    # The client side is not what is measured: its collector's full passes over a process's
    # hundreds of clients (a pause of a tenth of a second and more) would show up as latency.
    gc.collect()
    gc.freeze()
    gc.disable()
    ready.put((acked, len(connected)))
    cpu_before = None
    while not stop.is_set():
        if cpu_before is None and received:
            cpu_before = time.process_time()
        await asyncio.sleep(0.05)
    cpu = time.process_time() - (cpu_before or time.process_time())
    await asyncio.gather(*(client.disconnect() for client in connected), return_exceptions=True)
    return cpu, received


def run_fanout(
    services: Services, web: Child, web_url: str, targets: list[Target], args: argparse.Namespace
) -> list[Fanout]:
    """Connects --clients clients over --client-procs processes, each subscribed to
    --subscriptions of the jobs, then runs --runs emission windows of --fanout-seconds at
    --fanout-rate events per second, spread round-robin over the jobs."""
    context = multiprocessing.get_context("spawn")
    worker_pids = web_worker_pids(web)
    rss_before = web_rss_mb(worker_pids)
    plans = [
        [(t.job_id, t.key, t.next_seq - 1) for t in plan]
        for plan in subscriptions(args.clients, targets, args.subscriptions)
    ]
    ready, results, stop = context.Queue(), context.Queue(), context.Event()
    parts = [plans[i :: args.client_procs] for i in range(args.client_procs)]
    procs = [
        context.Process(
            target=fanout_clients, args=(web_url, part, ready, stop, results), daemon=True
        )
        for part in parts
        if part
    ]
    for proc in procs:
        proc.start()
    subscribers: dict[str, int] = {}
    connected = 0
    for _ in procs:
        acked, count = ready.get(timeout=300)
        connected += count
        for job_id, n in acked.items():
            subscribers[job_id] = subscribers.get(job_id, 0) + n
    time.sleep(1.0)
    rss_after = web_rss_mb(worker_pids)
    count = int(args.fanout_rate * args.fanout_seconds)
    windows = []
    for run in range(1, args.runs + 1):
        # Events of a run go round-robin over the jobs: event i to job i % len(targets).
        expected = sum(subscribers.get(targets[i % len(targets)].job_id, 0) for i in range(count))
        spy = None
        if args.profile and run == args.runs and have_pyspy():
            args.profile_dir.mkdir(parents=True, exist_ok=True)
            (args.profile_dir / ".gitignore").write_text("*\n")
            path = args.profile_dir / "events-fanout-web.txt"
            spy = start_pyspy(worker_pids[0], path, args.fanout_seconds, mode="gil", rate=100)
        cpu_before, machine_before = web_cpu_seconds(worker_pids), machine_cpu()
        began = time.time()
        sender = start_sender(
            emit_deltas,
            services.env(),
            [(t.job_id, t.owner, t.next_seq) for t in targets],
            args.fanout_rate,
            count,
        )
        sender.join()
        for index, target in enumerate(targets):
            target.next_seq += len(range(index, count, len(targets)))
        time.sleep(2.0)
        web_cpu, ended = web_cpu_seconds(worker_pids) - cpu_before, time.time()
        if spy is not None:
            spy.wait(timeout=60)
        windows.append((run, began, ended, expected, web_cpu, machine_before, machine_cpu()))
    stop.set()
    collected = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    received = [item for _cpu, items in collected for item in items]
    clients_cpu = sum(cpu for cpu, _items in collected)
    total_window = sum(end - began for _run, began, end, *_rest in windows)
    fanouts = []
    for run, began, end, expected, web_cpu, machine_before, machine_after in windows:
        values = [latency for sent_at, latency in received if began <= sent_at < end]
        busy = machine_after[0] - machine_before[0]
        fanouts.append(
            Fanout(
                run,
                args.clients,
                connected,
                count,
                expected,
                len(values),
                percentile(values, 0.5),
                percentile(values, 0.99),
                max(values, default=float("nan")),
                web_cpu,
                100 * clients_cpu / max(1e-9, total_window),
                100 * busy / max(1e-9, machine_after[1] - machine_before[1]),
                rss_before,
                rss_after,
            )
        )
    return fanouts


# The web process -------------------------------------------------------------------------------


def start_web(services: Services, workers: int = 1) -> tuple[Child, str]:
    import httpx

    from devtools.processes import free_port

    port = free_port()
    cmd = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--worker-class", "gevent"]
    # One web process by default; more connections than the Procfile's 1,000 for the
    # 1,000-client phase.
    cmd += ["--workers", str(workers), "--worker-connections", "3000", "app:create_app()"]
    web = Child("web", cmd, services.env(), services.workdir).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            live = httpx.get(f"{url}/api/v1/live", timeout=1).status_code == 200
            if live and len(web_worker_pids(web)) >= workers:
                return web, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the web process did not answer:\n{web.log_tail()}")


def web_worker_pids(web: Child) -> list[int]:
    return [int(c) for c in Path(f"/proc/{web.pid}/task/{web.pid}/children").read_text().split()]


def web_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def web_rss_mb(pids: list[int]) -> float:
    return sum(status_kb(pid, "VmRSS") or 0 for pid in pids) / 1024


# Main ------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    count = int(args.rate * args.seconds)
    began = time.monotonic()
    with private_services() as services:
        web, url = start_web(services, args.web_workers)
        try:
            targets = new_targets(services, max(1, args.fanout_jobs))
            target = targets[0]
            print(f"services and the web process ready in {time.monotonic() - began:.1f} s")
            runs: list[tuple[Phase, Phase]] = []
            for run in range(1, (0 if args.fanout_only else args.runs) + 1):
                raw = run_raw(services, args.rate, count)
                socket_phase = run_socket(services, url, target, args.rate, count)
                runs.append((raw, socket_phase))
                for phase in (raw, socket_phase):
                    print(
                        f"run {run} {phase.name:<34} {phase.received:>6}/{phase.sent} received"
                        f"  p50 {phase.p50:6.2f} ms  p99 {phase.p99:6.2f} ms"
                    )
            fanout = run_fanout(services, web, url, targets, args)
            for f in fanout:
                print(
                    f"run {f.run} fanout {f.delivered:>7}/{f.expected} delivered  p50 "
                    f"{f.p50:6.1f} ms  p99 {f.p99:6.1f} ms  web CPU {f.cpu_ms_per_1000:5.1f} "
                    f"ms/1,000 events  machine {f.machine_pct:3.0f}%"
                )
        finally:
            web.stop()
    report(args, runs, fanout)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


def report(args: argparse.Namespace, runs: list[tuple[Phase, Phase]], fanout: list[Fanout]) -> None:
    if runs:
        report_latency(args, runs)
    report_fanout(args, fanout)


def report_latency(args: argparse.Namespace, runs: list[tuple[Phase, Phase]]) -> None:
    raw_p50 = median([raw.p50 for raw, _ in runs])
    raw_p99 = median([raw.p99 for raw, _ in runs])
    sock_p50 = median([s.p50 for _, s in runs])
    sock_p99 = median([s.p99 for _, s in runs])
    print_table(
        f"Medians of {len(runs)} runs at {args.rate} events/s for {args.seconds:g} s each",
        ["path", "received", "p50 ms", "p99 ms"],
        [
            [
                "raw Redis PUBLISH -> SUBSCRIBE",
                f"{median([r.received for r, _ in runs]):.0f}",
                f"{raw_p50:.2f}",
                f"{raw_p99:.2f}",
            ],
            [
                "worker emit -> Socket.IO client",
                f"{median([s.received for _, s in runs]):.0f}",
                f"{sock_p50:.2f}",
                f"{sock_p99:.2f}",
            ],
        ],
    )
    print_table(
        "Targets",
        ["target", "measured", "bound", ""],
        [
            [
                "p50 within raw + 5 ms",
                f"{sock_p50:.2f} ms",
                f"{raw_p50 + 5:.2f} ms",
                "met" if sock_p50 <= raw_p50 + 5 else "MISSED",
            ],
            [
                "p99 within 5 x raw",
                f"{sock_p99:.2f} ms",
                f"{5 * raw_p99:.2f} ms",
                "met" if sock_p99 <= 5 * raw_p99 else "MISSED",
            ],
        ],
    )


FANOUT_TARGET_P99_MS = 100.0


# What the web process does per delivered event, first matching rule wins (Profile.breakdown).
FANOUT_RULES: list[Rule] = [
    (
        "Redis listener: decode, put on each client's queue",
        [("_thread (", "socketio/pubsub_manager.py")],
    ),
    ("WebSocket frame (simple-websocket, wsproto)", [("simple_websocket/",), ("wsproto/",)]),
    ("engine.io writer: queue get/put, timeouts", [("writer (", "engineio/socket.py")]),
    ("engine.io/socket.io other", [("engineio/",), ("socketio/",)]),
    ("gevent hub (switches, timers, I/O waits)", [("gevent/",)]),
]


def print_fanout_profile(args: argparse.Namespace) -> None:
    profile = Profile.load([args.profile_dir / "events-fanout-web.txt"])
    if not profile.total():
        print("(no profile samples: is py-spy installed and ptrace allowed?)")
        return
    print_table(
        f"Web process CPU in the last fanout window by category ({profile.total()} samples of "
        "the GIL holder, py-spy at 100 Hz)",
        ["category", "%", "samples"],
        [[name, share, count] for name, count, share in profile.breakdown(FANOUT_RULES)],
    )
    print_table(
        "Top leaf functions",
        ["function", "%"],
        [[f, share] for f, share in profile.top_functions(15)],
    )


def report_fanout(args: argparse.Namespace, fanouts: list[Fanout]) -> None:
    first = fanouts[0]
    p99 = median([f.p99 for f in fanouts])
    per_job = first.clients * args.subscriptions / max(1, args.fanout_jobs)
    print_table(
        f"{first.clients} clients over {args.client_procs} processes on {args.web_workers} "
        f"web process(es), each "
        f"subscribed to {args.subscriptions} of {args.fanout_jobs} jobs (~{per_job:.0f} "
        f"subscribers per job); {args.fanout_rate:g} events/s round-robin over the jobs for "
        f"{args.fanout_seconds:g} s; medians of {len(fanouts)} windows",
        [
            "connected",
            "delivered / expected",
            "p50 ms",
            "p99 ms",
            "p99 by run",
            "max ms",
            "web CPU ms per 1,000 events",
            "clients CPU %",
            "machine %",
            "web RSS before -> after",
            "per client",
        ],
        [
            [
                f"{first.connected}",
                f"{median([f.delivered for f in fanouts]):.0f} / {first.expected}",
                f"{median([f.p50 for f in fanouts]):.1f}",
                f"{p99:.1f}",
                " ".join(f"{f.p99:.0f}" for f in fanouts),
                f"{median([f.max for f in fanouts]):.0f}",
                f"{median([f.cpu_ms_per_1000 for f in fanouts]):.1f}",
                f"{first.clients_cpu_pct:.0f}",
                f"{median([f.machine_pct for f in fanouts]):.0f}",
                f"{first.rss_before_mb:.0f} -> {first.rss_after_mb:.0f} MB",
                f"{first.kb_per_client:.0f} KB",
            ]
        ],
    )
    verdict = "met" if p99 <= FANOUT_TARGET_P99_MS else "MISSED"
    print(f"  target p99 <= {FANOUT_TARGET_P99_MS:g} ms: {verdict}")
    if args.profile:
        print_fanout_profile(args)


if __name__ == "__main__":
    run_main(main)
