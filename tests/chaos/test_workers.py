"""Workers killed, stopped and racing the database: no job lost, stuck or run to success twice.

Bounds: with a 3 s lease renewed every 1 s and a sweep every 1 s, a job whose worker died is
queued again at most lease + sweep (4 s) after the last renewal, and runs again at once on a
live worker; each test allows that plus the job's own length and start-up slack.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

from tests.chaos.conftest import Cluster

STREAM = "[[sim tokens=200 tps=50]]"  # a 4 s streamed answer


def test_sigkill_of_the_whole_worker_mid_stream(cluster: Cluster) -> None:
    sigkill_mid_stream(cluster)


def test_sigkill_of_the_whole_worker_mid_stream_on_rabbitmq(rabbitmq_cluster: Cluster) -> None:
    """RabbitMQ gives the dead worker's message back the moment its connection drops, long
    before the lease expires: the redelivery finds the job still claimed and is dropped, and
    the sweeper's republish after the lease runs it, once."""
    # More start-up slack: a worker on AMQP declares its queues and event exchanges first.
    sigkill_mid_stream(rabbitmq_cluster, startup_slack=20)
    running = rabbitmq_cluster.sql("SELECT count(*) FROM jobs WHERE status = 'running'")
    assert running == [(0,)]


def sigkill_mid_stream(cluster: Cluster, startup_slack: float = 10) -> None:
    cluster.start_beat()
    doomed = cluster.start_worker("doomed", pool="gevent")
    job_id = cluster.submit(f"{STREAM} killed mid-stream")
    cluster.wait_status(job_id, "running")
    time.sleep(1.5)  # well into the stream
    killed_at = time.monotonic()
    cluster.stop(doomed, signal.SIGKILL)
    cluster.start_worker("survivor", pool="gevent")

    job, _ = cluster.wait_terminal(job_id, within=40)
    recovery = time.monotonic() - killed_at

    assert job["status"] == "succeeded" and job["attempt"] == 2
    # Two calls reached the model: the cut one and the one that finished. Only the second is
    # recorded: a SIGKILLed worker writes nothing, so the spend of its cut call is lost.
    assert cluster.sim.stats()["requests"] == 2
    assert cluster.model_calls(job_id) == 1
    print(f"[chaos] worker SIGKILL: job ended {recovery:.1f} s after the kill")
    assert recovery < 4 + 4 + startup_slack  # lease + sweep, the 4 s answer, the new worker
    cluster.assert_sound(job_id)


def test_sigkill_in_the_last_step_resumes_there_without_paying_again_for_the_others(
    cluster: Cluster,
) -> None:
    """An article (app/kinds/article.py) is three steps: the outline and the draft are quick,
    the edit is a 4 s stream. The worker dies during the edit; the next attempt must reuse
    the outline and draft checkpoints, so the model sees their calls once."""
    tag = f"kill-{uuid.uuid4().hex[:8]}"
    cluster.start_beat()
    doomed = cluster.start_worker("doomed", pool="gevent")
    with cluster.http() as client:
        response = client.post(
            "/jobs",
            json={
                "kind": "article",
                "input": {
                    "topic": f"Belts [[sim tag={tag}]]",
                    "edit_notes": f"Tighten it [[sim tag={tag} tokens=200 tps=50]]",
                },
            },
        )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def edit_started() -> bool:
        return bool(
            cluster.sql(
                "SELECT 1 FROM job_events WHERE job_id = %s AND type = 'job.step' "
                "AND data->>'step' = 'edit' AND data->>'status' = 'started'",
                job_id,
            )
        )

    deadline = time.monotonic() + 30
    while not edit_started():
        assert time.monotonic() < deadline, "the edit step never started"
        time.sleep(0.05)
    time.sleep(1.0)  # well into the edit's stream
    cluster.stop(doomed, signal.SIGKILL)
    cluster.start_worker("survivor", pool="gevent")

    job, _ = cluster.wait_terminal(job_id, within=40)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    systems = [request["system"] for request in cluster.sim.requests(tag)]
    assert sum(system.startswith("You plan articles") for system in systems) == 1
    assert sum(system.startswith("You write articles") for system in systems) == 1
    assert sum(system.startswith("You edit articles") for system in systems) == 2
    assert len(systems) == 4
    checkpoints = cluster.sql(
        "SELECT name, attempt FROM job_steps WHERE job_id = %s ORDER BY attempt, name", job_id
    )
    assert checkpoints == [("draft", 1), ("outline", 1), ("edit", 2)]
    # The killed edit call is lost with its worker; the others are recorded once each.
    calls = cluster.sql(
        "SELECT step, attempt FROM model_calls WHERE job_id = %s ORDER BY id", job_id
    )
    assert calls == [("outline", 1), ("draft", 1), ("edit", 2)]
    reused = cluster.sql(
        "SELECT data->>'step' FROM job_events WHERE job_id = %s AND type = 'job.step' "
        "AND data->>'status' = 'reused' ORDER BY seq",
        job_id,
    )
    assert reused == [("outline",), ("draft",)]
    cluster.assert_sound(job_id)


def test_sigkill_of_a_prefork_child_mid_stream(cluster: Cluster) -> None:
    cluster.start_beat()
    worker = cluster.start_worker("prefork", pool="prefork", concurrency=2)
    job_id = cluster.submit(f"{STREAM} child killed")
    cluster.wait_status(job_id, "running")
    time.sleep(1.0)
    child_pid = int(cluster.db_job(job_id)["worker"].rsplit(":", 1)[1])
    assert child_pid != worker.pid
    signal_sent = time.monotonic()
    os.kill(child_pid, signal.SIGKILL)

    job, _ = cluster.wait_terminal(job_id, within=40)
    print(f"[chaos] prefork child SIGKILL: job ended {time.monotonic() - signal_sent:.1f} s after")
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert time.monotonic() - signal_sent < 4 + 4 + 10
    assert worker.poll() is None  # the parent replaced its child and lives on
    cluster.assert_sound(job_id)


def test_sigterm_lets_running_jobs_finish(cluster: Cluster) -> None:
    worker = cluster.start_worker("graceful", pool="gevent")
    job_id = cluster.submit(f"{STREAM} stopped gracefully")
    cluster.wait_status(job_id, "running")
    stopping = time.monotonic()
    cluster.stop(worker, signal.SIGTERM)  # Celery's warm shutdown waits for the task
    print(f"[chaos] worker SIGTERM: exited {time.monotonic() - stopping:.1f} s later, job done")

    assert worker.returncode == 0
    job = cluster.db_job(job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert cluster.model_calls(job_id) == 1
    cluster.assert_sound(job_id)


def test_a_task_delivered_before_its_row_exists_runs_once_the_row_does(cluster: Cluster) -> None:
    from celery import Celery

    from app.queue import celery_config

    cluster.start_beat()
    cluster.start_worker("early", pool="gevent")
    job_id = uuid.uuid4()
    sender = Celery("chaos")
    sender.conf.update(celery_config(cluster.settings()))
    sender.send_task("conveyor.run_job", args=[str(job_id)])  # nothing to claim yet
    time.sleep(2.0)  # the worker has taken it and let it go
    cluster.sql(
        "INSERT INTO jobs (id, owner, kind, status, input, max_attempts, last_seq, "
        "dispatched_at) VALUES (%s, 'chaos', 'chat', 'queued', %s, 3, 0, now())",
        job_id,
        '{"prompt": "late row"}',
    )
    # The sweeper publishes it once its dispatch is older than the grace period (2 s).
    job, took = cluster.wait_terminal(str(job_id), within=20)
    print(f"[chaos] task before its row: job ended {took:.1f} s after the row appeared")
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert took < 2 + 1 + 5
    cluster.assert_sound(str(job_id))


def test_a_job_outliving_the_visibility_timeout_is_not_run_twice(cluster: Cluster) -> None:
    from kombu import Connection

    from app.queue import celery_config

    # Redis may redeliver a task unacknowledged for 2 s; the job takes 6 s. Two workers, so
    # the redelivered message certainly reaches one that is free to claim it.
    for name in ("w1", "w2"):
        cluster.start_worker(
            name, pool="gevent", CONVEYOR_BROKER_VISIBILITY_TIMEOUT="2", CONVEYOR_LOG_LEVEL="INFO"
        )
    job_id = cluster.submit("[[sim tokens=300 tps=50]] longer than the visibility timeout")
    cluster.wait_status(job_id, "running")
    time.sleep(3.0)
    # Kombu consumers scan for overdue messages only every tenth idle poll (about 20 s); do
    # the scan any consumer would do, now.
    options = {**celery_config(cluster.settings())["broker_transport_options"]}
    options["visibility_timeout"] = 2
    with Connection(cluster.redis.url, transport_options=options) as connection:
        connection.default_channel.qos.restore_visible(num=100, interval=1)

    job, _ = cluster.wait_terminal(job_id, within=30)
    assert job["status"] == "succeeded" and job["attempt"] == 1
    # The message was delivered again while the job ran, and that delivery did nothing.
    logs = cluster.log("w1") + cluster.log("w2")
    # Named by the job's kind (message_labels): received twice, succeeded once.
    assert logs.count("conveyor.run_job:chat[") >= 3
    assert "not claimable" in logs, logs[-3000:]
    assert cluster.sim.stats()["requests"] == 1  # no second model call
    cluster.assert_sound(job_id)


def test_a_poison_job_that_always_kills_its_worker_fails_after_its_attempts(
    cluster: Cluster,
) -> None:
    cluster.start_beat()
    worker = cluster.start_worker("prefork", pool="prefork", concurrency=2)
    job_id = cluster.submit(f"{STREAM} poison")
    crashes = 0
    began = time.monotonic()
    deadline = began + 60
    # Every attempt's process dies as soon as it has claimed the job, as a job that crashes
    # the interpreter would make it.
    while cluster.db_job(job_id)["status"] not in ("failed", "succeeded", "canceled"):
        assert time.monotonic() < deadline, cluster.db_job(job_id)
        job = cluster.db_job(job_id)
        if job["status"] == "running" and job["attempt"] > crashes:
            os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
            crashes += 1
        time.sleep(0.05)

    job = cluster.db_job(job_id)
    print(f"[chaos] poison job: failed {time.monotonic() - began:.1f} s after it was submitted")
    assert job["status"] == "failed" and job["error_code"] == "worker_lost"
    assert job["attempt"] == 3 and crashes == 3
    time.sleep(3.0)  # no redelivery loop: nothing claims it again
    assert cluster.db_job(job_id)["attempt"] == 3
    assert cluster.sim.stats()["requests"] <= 3  # each attempt died before or in its call
    assert worker.poll() is None  # the worker itself survived its children
    cluster.assert_sound(job_id)
