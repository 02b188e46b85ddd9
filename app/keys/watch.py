"""Ends what a revoked or expired API key holds open in this web process: Socket.IO
connections, event streams and long-polls.

A key is checked when a request or a connection starts (app/keys/api_keys.py); these outlive that
check by minutes or hours. So each one is registered here with its key, and a background task
asks PostgreSQL every CHECK_SECONDS which of those keys have been revoked or have expired, in
one query for all of them, and cuts off whatever holds one. (An expiry is a revocation at the
key's `expires_at`: the check that follows it cuts off what the key held.) With the streams'
own wait slices (1.5 s) that ends them a few seconds after a revocation, well inside the key
cache's window (api_keys.CACHE_SECONDS), whichever process revoked the key. (One admitted
during that window by a stale cached key is cut off by the check that follows.)

The task starts with the first registration, so a process that never serves a connection (a
Celery worker builds the same app) never runs it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

from app.keys.api_keys import inactive_among

if TYPE_CHECKING:
    from app.db import Database

logger = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
EXTENSION_KEY = "conveyor.key_watch"

StartTask = Callable[[Callable[[], None]], Any]


@dataclass(eq=False)
class Grant:
    """One connection, stream or long-poll that a key holds open. `revoked` turns true when the
    key is found revoked or expired, after which `on_revoked` is called once (from the watch's
    task)."""

    key_id: uuid.UUID
    on_revoked: Callable[[], None] | None = None
    revoked: bool = False


class KeyWatch:
    """The grants of this process and the task that checks their keys.

    `start_task` and `sleep` are Socket.IO's, which use greenlets under gunicorn's gevent worker
    and threads elsewhere."""

    def __init__(self, db: Database, start_task: StartTask, sleep: Callable[[float], None]) -> None:
        self._db = db
        self._start_task = start_task
        self._sleep = sleep
        self._grants: set[Grant] = set()
        self._lock = threading.Lock()
        self._started = False

    def watch(self, key_id: uuid.UUID, on_revoked: Callable[[], None] | None = None) -> Grant:
        grant = Grant(key_id, on_revoked)
        with self._lock:
            self._grants.add(grant)
            start, self._started = not self._started, True
        if start:
            self._start_task(self._run)
        return grant

    def forget(self, grant: Grant) -> None:
        with self._lock:
            self._grants.discard(grant)

    def check(self) -> None:
        """Revokes every grant whose key has been revoked or has expired."""
        with self._lock:
            grants = list(self._grants)
        if not grants:
            return
        revoked = inactive_among(self._db, {grant.key_id for grant in grants})
        for grant in grants:
            if grant.key_id in revoked:
                self._revoke(grant)

    def _revoke(self, grant: Grant) -> None:
        self.forget(grant)
        grant.revoked = True
        if grant.on_revoked is None:
            return
        try:
            grant.on_revoked()
        except Exception:  # one that fails must not spare the others
            logger.exception("could not cut off what revoked key %s held", grant.key_id)

    def _run(self) -> None:
        while True:
            self._sleep(CHECK_SECONDS)
            try:
                self.check()
            except Exception:
                # The task must outlive a database outage: if it ended, no revocation would
                # ever be enforced in this process again. Until the database answers, open
                # connections stay open, as they would without the check.
                logger.exception("revoked key check failed; retrying in %s s", CHECK_SECONDS)


def init_app(
    app: Flask, db: Database, start_task: StartTask, sleep: Callable[[float], None]
) -> None:
    app.extensions[EXTENSION_KEY] = KeyWatch(db, start_task, sleep)


def key_watch() -> KeyWatch:
    return current_app.extensions[EXTENSION_KEY]
