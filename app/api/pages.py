"""Keyset pagination of a caller's rows, newest first, for the list endpoints: a cursor is the
last row's (created_at, id), so a page is one index range scan however deep it is."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from app.api.problems import field_problem
from app.api.schemas import BadCursor, decode_cursor, encode_cursor


class Keyed(Protocol):
    created_at: datetime
    id: uuid.UUID


Row = TypeVar("Row", bound=Keyed)
Keyset = tuple[datetime, uuid.UUID]


def keyset_page(
    cursor: str | None, limit: int, fetch: Callable[[int, Keyset | None], Sequence[Row]]
) -> tuple[Sequence[Row], str | None]:
    """`fetch(n, before)` returns up to n rows older than `before`; one more than the page is
    asked for, to know whether there is a next page. A bad cursor is a 422 naming `cursor`."""
    before = None
    if cursor is not None:
        try:
            before = decode_cursor(cursor)
        except BadCursor as exc:
            raise field_problem("cursor", str(exc), str(exc)) from None
    found = fetch(limit + 1, before)
    page = found[:limit]
    more = len(found) > limit
    return page, encode_cursor(page[-1].created_at, page[-1].id) if more else None
