"""Conveyor across hosts (tests/cluster/conftest.py builds them): events cross from a worker
host to a web replica, a worker host cut off from the network loses its job to another and
cannot write once it is back, and a killed web replica's clients resume on the other.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from app.jobs.events import stream_key
from tests.chaos.conftest import Cluster
from tests.cluster.conftest import WEB_HOSTS, WORKER_HOSTS, Follower, Hosts, wait_for
from tests.cluster.network import listeners

SHORT = "[[sim tokens=250 tps=50]]"  # a 5 s streamed answer
LONG = "[[sim tokens=300 tps=30]]"  # a 10 s streamed answer


def test_the_stores_listen_on_the_bridge_only(hosts: Hosts) -> None:
    """PostgreSQL, Redis and the simulator serve the hosts on the bridge, and nothing else:
    not 0.0.0.0, not the machine's own network."""
    cluster = hosts.cluster
    for store in (cluster.pg, cluster.redis, cluster.sim):
        addresses = {address for pid, address in listeners() if pid == store.pid}
        assert addresses == {hosts.network.gateway}, (store.name, addresses)


def last_seq(cluster: Cluster, job_id: str) -> int:
    return cluster.sql("SELECT last_seq FROM jobs WHERE id = %s", job_id)[0][0]


def test_a_client_of_replica_a_hears_the_job_a_worker_on_host_c_runs(hosts: Hosts) -> None:
    """Only host C runs a worker; the job is submitted to replica B and followed on replica A:
    its events travel worker-c → Redis → web-a → the client, live."""
    hosts.run_workers("worker-c")
    with hosts.api("web-b") as api:
        response = api.post("/jobs", json={"kind": "chat", "input": {"prompt": f"{SHORT} hi"}})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    with Follower(hosts.replicas["web-a"].url, hosts.cluster.key, job_id) as follower:
        wait_for(follower.finished, 60, "the job's end, heard on replica A")

    assert hosts.host_of(job_id) == "worker-c"
    assert follower.types()[-1] == "job.succeeded"
    assert follower.acks[0]["ok"], follower.acks
    # Events arrived live, after the subscription's replay, from the other host.
    live = len(follower.received) - follower.acks[0]["replayed"]
    assert live >= 10, follower.acks
    assert follower.seqs() == list(range(1, last_seq(hosts.cluster, job_id) + 1))
    print(f"[cluster] replica A heard {live} live events of the job run on host C")


def job_state(cluster: Cluster, job_id: str) -> dict[str, Any]:
    """Everything an attempt writes: the row, the durable events, the replayable stream."""
    row = cluster.sql(
        "SELECT status, attempt, worker, output, error_code, finished_at, last_seq, progress "
        "FROM jobs WHERE id = %s",
        job_id,
    )
    events = cluster.sql(
        "SELECT seq, type, data FROM job_events WHERE job_id = %s ORDER BY seq", job_id
    )
    client = redis.Redis.from_url(cluster.redis.url)
    stream = [entry_id for entry_id, _ in client.xrange(stream_key(job_id))]
    client.close()
    return {"row": row, "events": events, "stream": stream}


def draw(cluster: Cluster, prompt: str) -> tuple[str, str]:
    """A new canvas, and a canvas job that draws on it."""
    with cluster.http() as api:
        canvas = api.post("/canvases", json={"name": "board"})
        assert canvas.status_code == 201, canvas.text
        canvas_id = canvas.json()["id"]
        job = {"kind": "canvas", "input": {"canvas_id": canvas_id, "prompt": prompt}}
        response = api.post("/jobs", json=job)
    assert response.status_code == 202, response.text
    return canvas_id, response.json()["id"]


def test_a_worker_host_cut_off_mid_job_loses_it_and_cannot_write_once_back(
    hosts: Hosts,
) -> None:
    """A canvas job: its effect, the objects it draws, is saved on the canvas by the write that
    finishes it; two attempts that both finished would draw twice."""
    cluster = hosts.cluster
    hosts.run_workers(*WORKER_HOSTS)
    tag = f"cut-{uuid.uuid4().hex[:8]}"
    canvas_id, job_id = draw(cluster, f"[[sim duration=10 tag={tag}]] a flow chart")
    cluster.wait_status(job_id, "running", within=30)
    victim = hosts.host(hosts.host_of(job_id))
    events = redis.Redis.from_url(cluster.redis.url)
    wait_for(lambda: events.xlen(stream_key(job_id)) >= 5, 30, "the answer streaming")
    events.close()

    def stale_attempt_ended() -> list[str]:
        messages = [record["message"] for record in hosts.worker_records(victim.name, job_id)]
        ended = {"stopped: lease lost", "outcome not recorded: lease lost"}
        return messages if ended & set(messages) else []

    hosts.network.cut(victim)
    cut_at = time.monotonic()
    try:
        job, _ = cluster.wait_terminal(job_id, within=90)
        recovered = time.monotonic() - cut_at
        settled = job_state(cluster, job_id)
        # Cut off, the stale worker could not even learn it had lost the job.
        assert not stale_attempt_ended()
    finally:
        hosts.network.reconnect(victim)
    back_at = time.monotonic()

    # Finished elsewhere: attempt 2 on another worker host, after the sweeper took the job
    # back from the lapsed lease of attempt 1.
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    rescuer = hosts.host_of(job_id)
    assert rescuer in WORKER_HOSTS and rescuer != victim.name
    requeues = [data for _, kind, data in settled["events"] if kind == "job.retrying"]
    assert len(requeues) == 1 and requeues[0]["error"]["code"] == "worker_lost", requeues
    print(f"[cluster] {victim.name} cut off: the job ended on {rescuer} {recovered:.1f} s later")
    assert recovered < 3 + 1 + 10 + 30  # lease + sweep + the 10 s answer, and slack

    # Back on the network, the stale worker (still alive: it was cut off, not killed) goes on
    # with attempt 1: its next write (a lease renewal, a progress event, its outcome) is
    # fenced by the attempt number, matches no row, and its attempt stops there.
    stale = hosts.workers[victim.name]
    messages = wait_for(stale_attempt_ended, 120, f"{victim.name}'s stale attempt ending")
    print(
        f"[cluster] {victim.name} back: its attempt 1 was refused "
        f"{time.monotonic() - back_at:.1f} s later ({messages})"
    )
    assert stale.poll() is None
    assert job_state(cluster, job_id) == settled  # nothing of attempt 1 landed
    # Exactly one effect: one result, one terminal event (assert_sound), and the model was
    # called once per attempt: the cut call and the one that finished.
    assert len(cluster.sim.requests(tag)) == 2
    calls = cluster.sql("SELECT attempt FROM model_calls WHERE job_id = %s", job_id)
    assert sorted(calls).count((2,)) == 1 and len(calls) <= 2, calls
    drawn = cluster.sql("SELECT id, job_id FROM canvas_objects WHERE canvas_id = %s", canvas_id)
    made = job["output"]["object_ids"]
    assert made and sorted(str(id_) for id_, _ in drawn) == sorted(made)
    assert {str(made_by) for _, made_by in drawn} == {job_id}
    print(f"[cluster] the canvas holds attempt 2's objects ({len(made)}), once")
    cluster.assert_sound(job_id)


def test_a_replica_killed_mid_stream_sends_its_clients_to_the_other_which_resumes_them(
    hosts: Hosts,
) -> None:
    cluster = hosts.cluster
    hosts.run_workers(*WORKER_HOSTS)
    job_id = cluster.submit(f"{LONG} replica killed")  # through the balancer
    balancer = hosts.balancer

    def one_holding() -> list[str]:
        """The one replica that holds a connection (the client's), once only one does."""
        holding = balancer.holding()
        return holding if len(holding) == 1 else []

    victim = ""
    try:
        with Follower(balancer.url, cluster.key, job_id) as follower:
            (victim,) = wait_for(one_holding, 20, "the client's connection at the balancer")
            wait_for(lambda: follower.last_seq() >= 20, 60, "the answer well under way")
            heard = follower.last_seq()
            hosts.replicas[victim].kill()
            killed_at = time.monotonic()
            wait_for(lambda: len(follower.acks) >= 2, 30, "the client subscribed again")
            resumed = time.monotonic() - killed_at
            wait_for(follower.finished, 60, "the job's end, after the kill")
            (survivor,) = wait_for(one_holding, 20, "the client's connection, moved")
    finally:
        if victim:
            hosts.replicas[victim].start()
            balancer.wait_ready()

    assert survivor != victim and survivor in WEB_HOSTS
    assert follower.connections == 2 and follower.acks[1]["ok"], follower.acks
    # It resumed from the last seq it had seen (at least what it had heard before the kill:
    # an event may still have arrived meanwhile), and nothing it had was sent again.
    first, resumed_from = follower.subscribed_after
    assert first == 0 and resumed_from >= heard, follower.subscribed_after
    second = [event["seq"] for connection, event in follower.received if connection == 2]
    assert second and min(second) > resumed_from
    # No gap: every seq of the job, once, up to the final event.
    assert follower.seqs() == list(range(1, last_seq(cluster, job_id) + 1))
    assert follower.types()[-1] == "job.succeeded"
    print(
        f"[cluster] {victim} killed after seq {heard}: the client resumed on {survivor} "
        f"{resumed:.1f} s later ({follower.duplicates} duplicates dropped by seq)"
    )
