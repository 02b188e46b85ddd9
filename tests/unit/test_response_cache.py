"""The response cache's keys and storage (app/llm/cache.py) on fakeredis."""

from __future__ import annotations

import fakeredis
import redis

from app.config import testing_settings as settings_for_tests
from app.llm.cache import PREFIX, CachedAnswer, ResponseCache, cache_key
from app.llm.client import ModelClient

MESSAGES = [{"role": "user", "content": "hi"}]


def test_the_key_depends_on_owner_model_messages_and_the_options_that_change_an_answer() -> None:
    base = cache_key("alice", "m", MESSAGES, {"temperature": 0})
    assert base == cache_key("alice", "m", MESSAGES, {"temperature": 0.0, "seed": None})
    assert base != cache_key("bob", "m", MESSAGES, {"temperature": 0})
    assert base != cache_key("alice", "m2", MESSAGES, {"temperature": 0})
    assert base != cache_key("alice", "m", [{"role": "user", "content": "hi!"}], {})
    for option in ({"seed": 1}, {"max_tokens": 5}, {"response_format": {"type": "json_object"}}):
        assert base != cache_key("alice", "m", MESSAGES, {"temperature": 0, **option})
    # The step a call belongs to does not change its answer.
    assert base == cache_key("alice", "m", MESSAGES, {"temperature": 0, "step": "outline"})


def test_an_owner_name_stays_inside_its_own_prefix() -> None:
    """Owners 'a:b' and 'a' must not share a prefix that a SCAN for one would match."""
    one, two = cache_key("a:b", "m", MESSAGES, {}), cache_key("a", "m", MESSAGES, {})
    assert one.startswith(PREFIX) and two.startswith(PREFIX)
    assert one.removeprefix(PREFIX).split(":")[0] != two.removeprefix(PREFIX).split(":")[0]
    assert one.count(":") == two.count(":")


def test_an_answer_is_stored_with_its_ttl_and_read_back_delta_by_delta() -> None:
    client = fakeredis.FakeRedis()
    cache = ResponseCache(client, ttl=60, max_bytes=10_000)
    key = cache_key("alice", "m", MESSAGES, {})
    assert cache.get(key) is None
    assert cache.put(key, CachedAnswer(["Hel", "lo", " ☃"], "stop")) is True
    assert 0 < client.ttl(key) <= 60
    hit = cache.get(key)
    assert hit == CachedAnswer(["Hel", "lo", " ☃"], "stop")
    assert hit is not None and hit.text == "Hello ☃"
    # The first answer stored stays: a racing second job does not replace it.
    assert cache.put(key, CachedAnswer(["other"], "stop")) is False
    assert cache.get(key) == hit


def test_an_answer_over_the_size_limit_is_not_stored() -> None:
    client = fakeredis.FakeRedis()
    cache = ResponseCache(client, ttl=60, max_bytes=100)
    key = cache_key("alice", "m", MESSAGES, {})
    assert cache.put(key, CachedAnswer(["x" * 200], "stop")) is False
    assert client.exists(key) == 0


def test_an_unreadable_entry_is_a_miss() -> None:
    client = fakeredis.FakeRedis()
    key = cache_key("alice", "m", MESSAGES, {})
    client.set(key, b"{not json")
    assert ResponseCache(client, ttl=60, max_bytes=100).get(key) is None


def test_redis_unavailable_is_a_miss_and_a_failed_write_is_not_an_error() -> None:
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    cache = ResponseCache(down, ttl=60, max_bytes=100)
    key = cache_key("alice", "m", MESSAGES, {})
    assert cache.get(key) is None
    assert cache.put(key, CachedAnswer(["x"], "stop")) is False


def test_a_zero_ttl_turns_the_cache_off() -> None:
    settings = settings_for_tests(response_cache_ttl=0)
    assert ModelClient(settings, fakeredis.FakeRedis()).cache is None
    assert ModelClient(settings_for_tests(), fakeredis.FakeRedis()).cache is not None
