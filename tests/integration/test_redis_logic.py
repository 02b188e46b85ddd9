"""The Redis-side cases fakeredis cannot stand in for, on a real Redis.

tests/unit/test_redis_logic.py writes them, marked `real_redis` with the reason, and skips them
on fakeredis; importing them here collects them again, on the `redis_client` below. They need
no PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from app import config
from app.runtime import build_redis
from devtools.redis_server import RedisServer
from tests.unit.test_redis_logic import (  # noqa: F401  collected here, on a real Redis
    test_a_publish_to_a_stalled_redis_fails_within_the_socket_timeout,
    test_a_wait_outlasts_the_clients_socket_timeout,
)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client as the app builds it, with its short socket timeout."""
    client = build_redis(config.testing_settings(redis_url=redis_server.url))
    yield client
    client.close()
