"""Model faults from the simulator that the integration tests do not cover: a call that hangs,
and faults that never go away. Retried with backoff within the budget, or failed with a precise
code; a failed attempt's partial text is never reported as the result."""

from __future__ import annotations

from tests.chaos.conftest import Cluster

SHORT_TIMEOUT = {"CONVEYOR_LLM_TIMEOUT": "2"}


def test_a_hung_call_times_out_and_the_retry_succeeds(cluster: Cluster) -> None:
    cluster.start_worker("w1", pool="gevent", **SHORT_TIMEOUT)
    job_id = cluster.submit("[[sim fault=hang times=1]] answer after a hang")
    job, took = cluster.wait_terminal(job_id, within=20)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    print(f"[chaos] hung model call: job ended after {took:.1f} s (timeout 2 s, then a retry)")
    # The timeout, the backoff and the answer, with room for a loaded machine (a full run beside
    # other work took 9.5 s); what it rules out is the attempt ending only by the job's time
    # limit (600 s) instead of by the read timeout.
    assert 2 <= took < 2 + 2 + 15
    assert cluster.sim.stats()["requests"] == 2
    codes = cluster.sql(
        "SELECT outcome FROM model_calls WHERE job_id = %s ORDER BY started_at", job_id
    )
    assert [code for (code,) in codes] == ["model_timeout", "ok"]
    cluster.assert_sound(job_id)


def test_faults_that_persist_fail_after_the_budget_with_their_code(cluster: Cluster) -> None:
    cluster.start_worker("w1", pool="gevent", **SHORT_TIMEOUT)
    expected = {"malformed": "model_bad_response", "drop": "model_stream_dropped"}
    jobs = {fault: cluster.submit(f"[[sim fault={fault}]] always {fault}") for fault in expected}
    for fault, job_id in jobs.items():
        job, _ = cluster.wait_terminal(job_id, within=30)
        assert job["status"] == "failed", (fault, job)
        assert job["error_code"] == expected[fault] and job["attempt"] == 3
        assert job["output"] is None  # partial text of a failed attempt is not a result
        cluster.assert_sound(job_id)
    assert cluster.sim.stats()["requests"] == 3 * len(jobs)
