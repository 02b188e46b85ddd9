"""Engine and session handling.

Web requests get one session that ends at teardown. Workers open a short transaction per
state change (`db.transaction()`) and never hold a connection across a model call: a model
call may take minutes, and a pool of hundreds of slots must not pin hundreds of connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, g
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings


class Database:
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    def init_app(self, app: Flask, settings: Settings) -> None:
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
            connect_args={
                "connect_timeout": 5,
                "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
                "application_name": "conveyor",
            },
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
        if self.engine is not None:
            self.engine.dispose()


db = Database()
