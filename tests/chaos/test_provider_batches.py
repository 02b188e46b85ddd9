"""A worker SIGKILLed while a provider batch is in flight (app/execution/provider_batches.py):
every job ends exactly once, the provider saw one batch, and the cost is the batch price.

The worker is killed inside the submission, the simulator holding the answer of its slow call
for 5 s after doing its work (`file_upload_delay`: the file is stored; `batch_create_delay`:
the batch exists and runs): after our row is committed and before the provider batch exists,
or after the provider made it and before its id is written here. And it is killed while the
provider runs the batch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal

from app.llm.pricing import PriceTable
from tests.chaos.conftest import Cluster

BATCH_ENV = {
    "CONVEYOR_PROVIDER_BATCH_WINDOW": "0.5",
    "CONVEYOR_PROVIDER_BATCH_INTERVAL": "0.3",
}
JOBS = 3
NORMAL = {
    "batch_validating": 0.1,
    "batch_seconds": 1.0,
    "batch_finalizing": 0.1,
    "file_upload_delay": 0.0,
    "batch_create_delay": 0.0,
}
MODEL = "gpt-4o-mini"  # the deployment's default model, which the jobs get


def start_batch_beat(cluster: Cluster) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat"]
    args += ["--loglevel", "WARNING", "--schedule", str(cluster.workdir / "beat-schedule")]
    return cluster.spawn("beat", args, **BATCH_ENV)


def submit_batched(cluster: Cluster, count: int) -> list[str]:
    with cluster.http() as client:
        ids = []
        for number in range(count):
            body = {"prompt": f"batched {number}", "service_tier": "batch", "max_tokens": 20}
            response = client.post("/jobs", json={"kind": "chat", "input": body})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
    return ids


def wait_for(condition: Callable[[], bool], what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {within} s"
        time.sleep(0.05)


def assert_each_ended_once_at_the_batch_price(cluster: Cluster, jobs: list[str]) -> None:
    for job_id in jobs:
        job, _ = cluster.wait_terminal(job_id, within=40)
        assert job["status"] == "succeeded", job
        assert job["attempt"] == 1  # handed over once, never run again
        cluster.assert_sound(job_id)
        (call,) = cluster.sql(
            "SELECT tokens_in, tokens_out, cost_usd FROM model_calls WHERE job_id = %s", job_id
        )
        tokens_in, tokens_out, cost = call
        half = PriceTable.load(None).cost(MODEL, tokens_in, tokens_out) / 2
        assert tokens_out > 0 and abs(cost - half) <= Decimal("0.00000002"), (cost, half)
        (job_cost,) = cluster.sql("SELECT cost_usd FROM jobs WHERE id = %s", job_id)[0]
        assert job_cost == cost
    # The provider saw one batch of these jobs (the simulator's counters were reset before
    # they were submitted), and it is over for us too.
    assert cluster.sim.stats()["batches_created"] == 1
    (sent,) = [batch for batch in cluster.sim.batches() if batch["requests"] == len(jobs)][-1:]
    assert sent["status"] == "completed", sent
    states = cluster.sql(
        "SELECT DISTINCT b.state FROM provider_batches b JOIN provider_batch_items i "
        "ON i.provider_batch = b.id WHERE i.job_id = ANY(%s::uuid[])",
        jobs,
    )
    assert states == [("ended",)], states
    open_items = cluster.sql("SELECT count(*) FROM provider_batch_items WHERE ended_at IS NULL")
    assert open_items == [(0,)]


def kill_inside(
    cluster: Cluster, slow: dict[str, float], reached: Callable[[], bool], phase: str
) -> tuple[list[str], str]:
    """Jobs handed over to a worker that is SIGKILLed once `reached()` is true, the simulator
    slowed by `slow` (its knobs) meanwhile; a new worker then takes over, and the other workers
    are gone. The jobs, and the name of the worker that took over."""
    for process in cluster.processes[1:]:  # the workers of an earlier phase; beat (first) stays
        cluster.stop(process, signal.SIGKILL)
    cluster.sim.reset()
    cluster.sim.configure(**slow)
    doomed = cluster.start_worker(f"doomed-{phase}", concurrency=4, **BATCH_ENV)
    jobs = submit_batched(cluster, JOBS)
    wait_for(reached, f"the moment to kill ({phase})")
    cluster.stop(doomed, signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.sim.configure(**NORMAL)
    survivor = f"survivor-{phase}"
    cluster.start_worker(survivor, concurrency=4, **BATCH_ENV)
    for job_id in jobs:
        cluster.wait_terminal(job_id, within=40)
    print(f"[chaos] {phase}: jobs ended {time.monotonic() - killed_at:.1f} s after the kill")
    return jobs, survivor


def test_sigkill_while_a_provider_batch_is_in_flight(cluster: Cluster) -> None:
    """Three times on one cluster (its start-up is most of the test's time): a worker killed
    after the provider made the batch, before its id was stored here (the next worker adopts
    it); one killed after our row was committed, before the provider made the batch (the next
    submits it, once); and one killed while the provider runs it (the next polls it)."""
    cluster.sim.configure(**NORMAL)
    start_batch_beat(cluster)  # the cluster's first process

    jobs, survivor = kill_inside(
        cluster,
        {"batch_create_delay": 5.0},
        lambda: cluster.sim.stats()["batches_created"] == 1,
        "inside-create",
    )
    assert_each_ended_once_at_the_batch_price(cluster, jobs)
    assert "adopted provider batch" in cluster.log(survivor)

    def uploading() -> bool:
        creating = cluster.sql("SELECT count(*) FROM provider_batches WHERE state = 'creating'")
        return creating == [(1,)] and cluster.sim.stats()["files_uploaded"] == 1

    jobs, _ = kill_inside(cluster, {"file_upload_delay": 5.0}, uploading, "inside-upload")
    assert cluster.sim.stats()["files_uploaded"] == 2  # the killed upload's file is left over
    assert_each_ended_once_at_the_batch_price(cluster, jobs)

    def running_at_the_provider() -> bool:
        return any(batch["status"] == "in_progress" for batch in cluster.sim.batches())

    jobs, _ = kill_inside(cluster, {"batch_seconds": 3.0}, running_at_the_provider, "in-progress")
    assert_each_ended_once_at_the_batch_price(cluster, jobs)
