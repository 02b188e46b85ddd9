"""docs/events.md and the dashboard's events.js follow the event payload models."""

from __future__ import annotations

import re

from app.jobs.payloads import PAYLOADS
from app.jobs.states import EventType
from devtools import event_docs


def test_the_event_table_in_the_docs_is_current() -> None:
    current = event_docs.DOCS.read_text()
    assert event_docs.render_docs(current) == current, (
        "docs/events.md is out of date: run python -m devtools.event_docs"
    )


def test_the_dashboards_event_types_are_current() -> None:
    assert event_docs.EVENTS_JS.read_text() == event_docs.events_js(), (
        "app/web/static/events.js is out of date: run python -m devtools.event_docs"
    )


def test_the_table_names_every_type_and_field() -> None:
    table = event_docs.event_table()
    for event_type, model in PAYLOADS.items():
        assert f"| `{event_type}` |" in table
        for name in model.model_fields:
            assert re.search(rf"\| `{event_type}` \| `{name}`\??", table), (event_type, name)


def test_the_check_says_when_a_file_is_stale(tmp_path, monkeypatch) -> None:
    docs = tmp_path / "events.md"
    docs.write_text(f"# Events\n{event_docs.BEGIN}\nold table\n{event_docs.END}\nafter\n")
    monkeypatch.setattr(event_docs, "DOCS", docs)
    monkeypatch.setattr(event_docs, "EVENTS_JS", tmp_path / "events.js")
    monkeypatch.setattr(event_docs, "ROOT", tmp_path)
    assert event_docs.main(["--check"]) == 1
    assert event_docs.main([]) == 0
    assert event_docs.main(["--check"]) == 0
    assert docs.read_text().endswith(f"{event_docs.END}\nafter\n")
    assert all(t.value in (tmp_path / "events.js").read_text() for t in EventType)
