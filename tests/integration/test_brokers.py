"""The Celery broker the session runs on (Redis, or RabbitMQ with CONVEYOR_TEST_BROKER=rabbitmq,
as `make test` runs this file and the lifecycle tests a second time): messages carry a job's
priority so that the broker itself hands out the most urgent first."""

from __future__ import annotations

import os
import random
import uuid

from flask import Flask
from kombu import Exchange, Queue

from app.queue import PRIORITY_STEPS, is_amqp, message_priority


def test_the_session_runs_on_the_broker_it_asked_for(app: Flask) -> None:
    url = app.extensions["conveyor"].celery.conf.broker_url
    wanted = os.environ.get("CONVEYOR_TEST_BROKER", "redis") == "rabbitmq"
    assert is_amqp(url) == wanted, url


def test_the_broker_hands_out_the_most_urgent_job_first(app: Flask) -> None:
    """Published in a random order to a queue declared as Conveyor declares its own, the
    messages come back by job priority, 9 first, whichever broker this is."""
    celery = app.extensions["conveyor"].celery
    url = celery.conf.broker_url
    name = f"priority-check-{uuid.uuid4().hex[:8]}"
    extra = {"max_priority": PRIORITY_STEPS[-1]} if is_amqp(url) else {}
    queue = Queue(name, Exchange(name), routing_key=name, auto_delete=False, **extra)
    priorities = list(range(10))
    random.shuffle(priorities)
    with celery.connection_for_write() as connection:
        bound = queue(connection.default_channel)
        bound.declare()
        try:
            producer = connection.Producer()
            for priority in priorities:
                producer.publish(
                    {"priority": priority},
                    exchange=queue.exchange,
                    routing_key=name,
                    priority=message_priority(url, priority),
                    retry=True,
                )
            got = []
            for _ in priorities:
                message = bound.get(no_ack=True)
                assert message is not None
                got.append(message.payload["priority"])
        finally:
            bound.delete()
    assert got == sorted(priorities, reverse=True)
