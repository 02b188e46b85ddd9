"""Engine and session handling.

Web requests get one session that ends at teardown. Workers open a short transaction per
state change (`db.transaction()`) and never hold a connection across a model call: a model
call may take minutes, and a pool of hundreds of slots must not pin hundreds of connections.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from flask import Flask, g
from sqlalchemy import Connection, Engine, Select, create_engine, tuple_
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.config import Settings

# How a streaming connection shows in pg_stat_activity.
STREAMING_APPLICATION_NAME = "conveyor-stream"


class Database:
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self._streaming_engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    def init_app(self, app: Flask, settings: Settings) -> None:
        connect_args = {
            "connect_timeout": 5,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
            "application_name": "conveyor",
        }
        self.engine = create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            # No pre-ping: it costs a round trip per checkout (half the transactions of a job).
            # A connection broken by a database restart fails one operation, and SQLAlchemy
            # then invalidates the whole pool, so the next checkout reconnects.
            pool_pre_ping=False,
            pool_recycle=1800,
            pool_timeout=10,
            connect_args=connect_args,
        )
        # A long read streamed to a client (an export) lasts as long as the client takes to
        # read it: its connection is its own, opened and closed per stream, so that it never
        # holds one of the pool's connections meanwhile. The caller bounds how many are open.
        self._streaming_engine = create_engine(
            settings.database_url,
            poolclass=NullPool,
            connect_args={**connect_args, "application_name": STREAMING_APPLICATION_NAME},
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        app.extensions["conveyor.db"] = self
        app.teardown_appcontext(self._end_request_session)

    def new_session(self) -> Session:
        assert self._sessions is not None, "Database.init_app was not called"
        return self._sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        with self.new_session() as session, session.begin():
            yield session

    @contextmanager
    def streaming_connection(self) -> Iterator[Connection]:
        """A connection outside the pool, in one transaction (which a server-side cursor needs),
        closed on exit."""
        assert self._streaming_engine is not None, "Database.init_app was not called"
        with self._streaming_engine.connect() as connection, connection.begin():
            yield connection

    @property
    def request_session(self) -> Session:
        """The session of the current web request, closed at teardown."""
        if "db_session" not in g:
            g.db_session = self.new_session()
        return g.db_session

    @staticmethod
    def _end_request_session(_exc: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()

    def dispose(self) -> None:
        for engine in (self.engine, self._streaming_engine):
            if engine is not None:
                engine.dispose()


def newest_page(
    session: Session,
    statement: Select[Any],
    model: Any,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Any]:
    """Up to `limit` rows of `statement` (over `model`), newest first by (created_at, id), after
    the keyset `before` when given: every list endpoint's page."""
    if before is not None:
        statement = statement.where(tuple_(model.created_at, model.id) < before)
    ordered = statement.order_by(model.created_at.desc(), model.id.desc()).limit(limit)
    return list(session.scalars(ordered))


db = Database()
