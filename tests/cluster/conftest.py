"""Several hosts on this machine (`make cluster`; not part of `make test`): network namespaces
on one bridge, each a host with its own address and hostname.

    root namespace   PostgreSQL, Redis and the model simulator, bound to the bridge's address
    lb               HAProxy in front of the two web replicas (the clients' entry point)
    ops              celery beat (the sweeper's schedule)
    web-a, web-b     gunicorn (gevent worker), as the Procfile runs it
    worker-c, -d, -e a Celery worker each (gevent pool, -Q conveyor), started per test

Leases are as short as the chaos suite's (tests/chaos/conftest.py: lease 3 s, heartbeat 1 s,
sweep every 1 s) so that recovery happens within seconds. Everything the run made is removed on
the way out, whatever happened; a run removes first what a crashed run left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
import socketio

from app.jobs.events import SOCKET_EVENT
from app.jobs.presence import WORKERS_KEY
from app.migrate import upgrade
from devtools.postgres import PostgresServer
from devtools.redis_server import RedisServer
from devtools.simprocess import SimulatorProcess
from tests.chaos.conftest import Cluster, create_key
from tests.cluster.balancer import Balancer
from tests.cluster.network import PREFIX, Host, Network, links, namespaces, remove_leftovers
from tests.webserver import WebServer

WEB_HOSTS = ("web-a", "web-b")
WORKER_HOSTS = ("worker-c", "worker-d", "worker-e")
HOSTS = ("lb", "ops", *WEB_HOSTS, *WORKER_HOSTS)
WEB_PORT = 8000
LB_PORT = 80


@dataclass
class Hosts:
    network: Network
    cluster: Cluster
    replicas: dict[str, WebServer]
    balancer: Balancer
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    def api(self, replica: str, timeout: float = 10) -> httpx.Client:
        """The API of one replica, not through the balancer."""
        return httpx.Client(
            base_url=f"{self.replicas[replica].url}/api/v1",
            headers={"Authorization": f"Bearer {self.cluster.key}"},
            timeout=timeout,
        )

    def run_workers(self, *names: str) -> None:
        """Exactly these worker hosts run a worker; waits until each new one has started."""
        for name in list(self.workers):
            if name not in names:
                self.cluster.stop(self.workers.pop(name))
        started = {}
        for name in names:
            if name not in self.workers or self.workers[name].poll() is not None:
                started[name] = self.workers[name] = self.cluster.start_worker(
                    name, pool="gevent", concurrency=10, wrap=self.host(name).wrap,
                    CONVEYOR_LOG_FORMAT="json",
                )  # fmt: skip
        client = redis.Redis.from_url(self.cluster.redis.url)
        deadline = time.monotonic() + 60
        # A worker's heartbeat records its presence ("<node>:<pid>") once its pool runs.
        while not all(
            any(key.endswith(f":{process.pid}".encode()) for key in client.hkeys(WORKERS_KEY))
            for process in started.values()
        ):
            for name, process in started.items():
                assert process.poll() is None, self.cluster.log(name)[-3000:]
            assert time.monotonic() < deadline, "worker hosts not up within 60 s"
            time.sleep(0.2)
        client.close()

    def host_of(self, job_id: str) -> str:
        """The host that runs (or ran) the job's current attempt, from its `worker` column."""
        worker = self.cluster.db_job(job_id)["worker"]
        return worker.rsplit(":", 1)[0]

    def worker_records(self, name: str, job_id: str) -> list[dict[str, Any]]:
        """The JSON log records a worker host wrote about one job."""
        records = []
        for line in self.cluster.log(name).splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("job_id") == job_id:
                    records.append(record)
        return records


def wait_for(predicate: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.1)
    return value


class Follower:
    """A Socket.IO client following one job as the dashboard does: on every (re)connect it
    subscribes with the last seq it has seen, and the server replays only what is newer."""

    def __init__(self, url: str, key: str, job_id: str) -> None:
        self.url = url
        self.key = key
        self.job_id = job_id
        # (connection number, event): which connection brought each event, each seq once.
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.duplicates = 0
        self.acks: list[dict[str, Any]] = []
        self.subscribed_after: list[int] = []
        self.connections = 0
        self.client = socketio.Client(
            reconnection=True, reconnection_delay=0.2, reconnection_delay_max=1
        )
        self.client.on("connect", self._connected)
        self.client.on(SOCKET_EVENT, self._event)

    def __enter__(self) -> Follower:
        self.client.connect(
            self.url, auth={"api_key": self.key}, transports=["websocket"], wait_timeout=20
        )
        return self

    def __exit__(self, *_: object) -> None:
        self.client.disconnect()

    def last_seq(self) -> int:
        return max((event["seq"] for _, event in self.received), default=0)

    def _connected(self) -> None:
        self.connections += 1
        after = self.last_seq()
        self.subscribed_after.append(after)
        self.client.emit(
            "subscribe", {"job_id": self.job_id, "after_seq": after}, callback=self.acks.append
        )

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("job_id") != self.job_id:
            return
        # An event published while the server joined the client to the room and read the
        # replay arrives twice: dropped by seq, as the protocol asks of clients.
        if any(seen["seq"] == event["seq"] for _, seen in self.received):
            self.duplicates += 1
            return
        self.received.append((self.connections, event))

    def seqs(self) -> list[int]:
        return sorted(event["seq"] for _, event in self.received)

    def types(self) -> list[str]:
        return [event["type"] for _, event in self.received]

    def finished(self) -> bool:
        return any(kind in ("job.succeeded", "job.failed") for kind in self.types())


@pytest.fixture(scope="session")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    removed = remove_leftovers()
    if removed:
        print(f"[cluster] removed the leftovers of a crashed run: {', '.join(removed)}")
    workdir = tmp_path_factory.mktemp("cluster")
    network = Network(HOSTS)
    stores: list[PostgresServer | RedisServer | SimulatorProcess] = []
    cluster: Cluster | None = None
    replicas: dict[str, WebServer] = {}
    try:
        network.create()
        here = network.gateway
        pg = PostgresServer(
            workdir / "pg", durable=False, host=here, trusted_network=str(network.subnet)
        )
        stores.append(pg.start())
        stores.append(redis_server := RedisServer(data_dir=workdir / "redis", host=here).start())
        # A 10 s answer is `[[sim tokens=300 tps=30]]` in a prompt; the defaults are quick.
        stores.append(sim := SimulatorProcess(host=here, ttft=0.05, tps=100).start())
        database_url = pg.create_database("conveyor_cluster")
        upgrade(database_url)
        cluster = Cluster(workdir, pg, redis_server, sim, database_url)
        cluster.key = create_key(cluster)
        for name in WEB_HOSTS:
            host = network.hosts[name]
            replicas[name] = WebServer(
                cluster.settings(), host=host.address, port=WEB_PORT, wrap=host.wrap
            ).start()
        lb = network.hosts["lb"]
        balancer = Balancer(
            workdir, lb.address, LB_PORT, {name: f"{network.hosts[name].address}:{WEB_PORT}"
                                           for name in WEB_HOSTS}
        )  # fmt: skip
        balancer.process = cluster.spawn("haproxy", balancer.command(), lb.wrap)
        balancer.wait_ready()
        cluster.entry_url = balancer.url
        cluster.start_beat(network.hosts["ops"].wrap)
        yield Hosts(network, cluster, replicas, balancer)
    finally:
        if cluster is not None:
            for process in cluster.processes:
                cluster.stop(process, signal.SIGKILL)
        for replica in replicas.values():
            replica.stop()
        for store in reversed(stores):
            store.stop()
        network.destroy()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """What a run leaves behind fails it: the namespaces and links of this process must be
    gone by now."""
    mine = f"{PREFIX}{os.getpid()}-"
    left = [name for name in namespaces() + links() if name.startswith(mine)]
    if left:
        print(f"[cluster] left behind: {left}")
        session.exitstatus = 1
