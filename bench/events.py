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
  fanout  --clients python-socketio AsyncClients connect to ONE web process and subscribe to
          one job; the emitter sends --fanout-rate events per second; delivered / expected,
          latency, and the web process's RSS before and after the clients connected

Latency is the receiver's clock minus the timestamp the sender put in the message (one machine,
one clock). Both peers run the same number of messages at the same rate, interleaved over
--runs runs; medians over runs are printed.

    python -m bench.events                       # about a minute and a half
    python -m bench.events --runs 1 --clients 200
"""

from __future__ import annotations

import argparse
import asyncio
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
    Child,
    Services,
    median,
    print_table,
    private_services,
    run_main,
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
    parser.add_argument("--fanout-rate", type=int, default=10, help="fanout: events per second")
    parser.add_argument("--fanout-seconds", type=float, default=10.0)
    return parser.parse_args()


# Senders (child processes) --------------------------------------------------------------------


def paced(rate: int, count: int) -> Any:
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
    env: dict[str, str], job_id: str, owner: str, first_seq: int, rate: int, count: int
) -> None:
    """What a worker does for each coalesced delta: EventBus.publish_later."""
    os.environ.update(env)
    from app import create_app
    from app.jobs.events import Event
    from app.jobs.payloads import OutputDeltaPayload
    from app.runtime import runtime

    app = create_app()
    with app.app_context():
        bus = runtime().bus
        for i in paced(rate, count):
            # Each delta's text is its send time: the receivers count distinct ones.
            delta = OutputDeltaPayload(text=repr(time.time()), progress=0.0)
            event = Event(uuid.UUID(job_id), owner, first_seq + i, delta)
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


def new_target(services: Services) -> Target:
    from app import create_app
    from app.keys.api_keys import create_api_key
    from app.runtime import runtime

    app = create_app(services.settings())
    with app.app_context():
        key = create_api_key(runtime().db, OWNER, "bench")
        job = runtime().jobs.create_job(owner=OWNER, kind="chat", input={"prompt": "events"}).job
        app.extensions["conveyor"].db.dispose()
    return Target(str(job.id), OWNER, key, 2)


def run_socket(services: Services, web_url: str, target: Target, rate: int, count: int) -> Phase:
    import socketio

    received = Received()
    client = socketio.Client(reconnection=False)
    client.on("job_event", lambda event: received.add(event["data"]["text"]))
    client.connect(web_url, auth={"api_key": target.key}, transports=["websocket"], wait_timeout=10)
    ack = client.call(
        "subscribe", {"job_id": target.job_id, "after_seq": target.next_seq - 1}, timeout=10
    )
    assert ack["ok"], ack
    env = services.env()
    sender = start_sender(
        emit_deltas, env, target.job_id, target.owner, target.next_seq, rate, count
    )
    sender.join()
    target.next_seq += count
    time.sleep(1.0)
    client.disconnect()
    return phase_of("worker emit -> Socket.IO client", count, received)


@dataclass
class Fanout:
    clients: int
    connected: int
    sent: int
    expected: int
    delivered: int
    p50: float
    p99: float
    rss_before_mb: float
    rss_after_mb: float

    @property
    def kb_per_client(self) -> float:
        return (self.rss_after_mb - self.rss_before_mb) * 1024 / max(1, self.connected)


async def _fanout_clients(
    web_url: str,
    target: Target,
    clients: int,
    received: Received,
    ready: threading.Event,
    stop: threading.Event,
) -> int:
    import socketio

    connected: list[Any] = []

    async def one() -> None:
        client = socketio.AsyncClient(reconnection=False)
        client.on("job_event", lambda event: received.add(event["data"]["text"]))
        await client.connect(
            web_url, auth={"api_key": target.key}, transports=["websocket"], wait_timeout=20
        )
        ack = await client.call(
            "subscribe", {"job_id": target.job_id, "after_seq": target.next_seq - 1}, timeout=20
        )
        if ack.get("ok"):
            connected.append(client)

    for start in range(0, clients, 50):  # in waves, so the listen backlog is not overrun
        results = await asyncio.gather(
            *(one() for _ in range(start, min(clients, start + 50))), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                print(f"  a client failed to connect: {result!r}")
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await asyncio.gather(*(client.disconnect() for client in connected), return_exceptions=True)
    return len(connected)


def run_fanout(
    services: Services, web: Child, web_url: str, target: Target, args: argparse.Namespace
) -> Fanout:
    worker_pid = web_worker_pid(web)
    rss_before = (status_kb(worker_pid, "VmRSS") or 0) / 1024
    received = Received()
    ready, stop = threading.Event(), threading.Event()
    result: dict[str, int] = {}

    def clients_loop() -> None:
        result["connected"] = asyncio.run(
            _fanout_clients(web_url, target, args.clients, received, ready, stop)
        )

    thread = threading.Thread(target=clients_loop, daemon=True)
    thread.start()
    if not ready.wait(180):
        raise RuntimeError("the fanout clients did not connect in time")
    time.sleep(1.0)
    rss_after = (status_kb(worker_pid, "VmRSS") or 0) / 1024
    count = int(args.fanout_rate * args.fanout_seconds)
    received.latencies_ms.clear()
    sender = start_sender(
        emit_deltas,
        services.env(),
        target.job_id,
        target.owner,
        target.next_seq,
        args.fanout_rate,
        count,
    )
    sender.join()
    target.next_seq += count
    time.sleep(2.0)
    stop.set()
    thread.join(60)
    connected = result.get("connected", 0)
    values = received.latencies_ms
    return Fanout(
        args.clients,
        connected,
        count,
        count * connected,
        len(values),
        percentile(values, 0.5),
        percentile(values, 0.99),
        rss_before,
        rss_after,
    )


# The web process -------------------------------------------------------------------------------


def start_web(services: Services) -> tuple[Child, str]:
    import httpx

    from devtools.processes import free_port

    port = free_port()
    cmd = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--worker-class", "gevent"]
    # One web process; more connections than the Procfile's 1,000 for the 1,000-client phase.
    cmd += ["--workers", "1", "--worker-connections", "3000", "app:create_app()"]
    web = Child("web", cmd, services.env(), services.workdir).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/v1/live", timeout=1).status_code == 200:
                return web, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the web process did not answer:\n{web.log_tail()}")


def web_worker_pid(web: Child) -> int:
    children = Path(f"/proc/{web.pid}/task/{web.pid}/children").read_text().split()
    return int(children[0])


# Main ------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    count = int(args.rate * args.seconds)
    began = time.monotonic()
    with private_services() as services:
        web, url = start_web(services)
        try:
            target = new_target(services)
            print(f"services and the web process ready in {time.monotonic() - began:.1f} s")
            runs: list[tuple[Phase, Phase]] = []
            for run in range(1, args.runs + 1):
                raw = run_raw(services, args.rate, count)
                socket_phase = run_socket(services, url, target, args.rate, count)
                runs.append((raw, socket_phase))
                for phase in (raw, socket_phase):
                    print(
                        f"run {run} {phase.name:<34} {phase.received:>6}/{phase.sent} received"
                        f"  p50 {phase.p50:6.2f} ms  p99 {phase.p99:6.2f} ms"
                    )
            fanout = run_fanout(services, web, url, target, args)
        finally:
            web.stop()
    report(args, runs, fanout)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


def report(args: argparse.Namespace, runs: list[tuple[Phase, Phase]], fanout: Fanout) -> None:
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
    print_table(
        f"{fanout.clients} clients on one web process, {args.fanout_rate} events/s for "
        f"{args.fanout_seconds:g} s to the job they all watch",
        [
            "connected",
            "delivered / expected",
            "p50 ms",
            "p99 ms",
            "web RSS before -> after",
            "per client",
        ],
        [
            [
                f"{fanout.connected}",
                f"{fanout.delivered} / {fanout.expected}",
                f"{fanout.p50:.1f}",
                f"{fanout.p99:.1f}",
                f"{fanout.rss_before_mb:.0f} -> {fanout.rss_after_mb:.0f} MB",
                f"{fanout.kb_per_client:.0f} KB",
            ]
        ],
    )


if __name__ == "__main__":
    run_main(main)
