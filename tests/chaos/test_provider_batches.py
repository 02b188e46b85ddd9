"""A worker SIGKILLed while it submits a provider batch (app/execution/provider_batches.py):
every job ends exactly once, the provider saw one batch, and the cost is the batch price.

The simulator holds the answer to the submission's slow call for 5 s after doing its work
(`file_upload_delay`: the file is stored; `batch_create_delay`: the batch exists and runs),
and the worker is killed inside that call: after our row is committed and before the provider
batch exists, or after the provider made it and before its id is written here.
"""

from __future__ import annotations

import signal
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
MODEL = "gpt-4o-mini"  # the deployment's default model, which the jobs get


def start_batch_beat(cluster: Cluster) -> None:
    args = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat"]
    args += ["--loglevel", "WARNING", "--schedule", str(cluster.workdir / "beat-schedule")]
    cluster.spawn("beat", args, **BATCH_ENV)


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
    cluster: Cluster, knob: str, reached: Callable[[], bool], worker: str
) -> tuple[list[str], str]:
    """Jobs handed over to a worker that is SIGKILLed once `reached()` is true while the
    simulator holds the answer of the call `knob` delays; a new worker then takes over. The
    jobs, and the name of the worker that took over."""
    cluster.sim.reset()
    cluster.sim.configure(**{knob: 5.0})
    doomed = cluster.start_worker(f"doomed-{worker}", concurrency=4, **BATCH_ENV)
    jobs = submit_batched(cluster, JOBS)
    wait_for(reached, f"the submission's slow call ({knob})")
    cluster.stop(doomed, signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.sim.configure(**{knob: 0.0})
    survivor = f"survivor-{worker}"
    cluster.start_worker(survivor, concurrency=4, **BATCH_ENV)
    for job_id in jobs:
        cluster.wait_terminal(job_id, within=40)
    print(f"[chaos] {knob}: jobs ended {time.monotonic() - killed_at:.1f} s after the kill")
    return jobs, survivor


def test_sigkill_while_submitting_a_provider_batch(cluster: Cluster) -> None:
    """Twice on one cluster (one's start-up is most of the test's time): killed after the
    provider made the batch, the next worker adopts it; killed before, it submits it once."""
    cluster.sim.configure(batch_validating=0.1, batch_seconds=1.0, batch_finalizing=0.1)
    start_batch_beat(cluster)

    jobs, survivor = kill_inside(
        cluster,
        "batch_create_delay",
        lambda: cluster.sim.stats()["batches_created"] == 1,
        "after-create",
    )
    assert_each_ended_once_at_the_batch_price(cluster, jobs)
    assert "adopted provider batch" in cluster.log(survivor)
    cluster.stop(cluster.processes[-1], signal.SIGKILL)  # that survivor: the next test's doomed

    def uploading() -> bool:
        creating = cluster.sql("SELECT count(*) FROM provider_batches WHERE state = 'creating'")
        return creating == [(1,)] and cluster.sim.stats()["files_uploaded"] == 1

    jobs, _ = kill_inside(cluster, "file_upload_delay", uploading, "before-create")
    assert cluster.sim.stats()["files_uploaded"] == 2  # the killed upload's file is left over
    assert_each_ended_once_at_the_batch_price(cluster, jobs)
