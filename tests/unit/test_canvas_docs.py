"""The canvas room's messages as docs/events.md and docs/canvas.md describe them: every
message name and every field of its model, so the docs cannot drift from the models."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.jobs.canvases import ROOM_MESSAGES, RoomMessage

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("doc", ["events.md", "canvas.md"])
@pytest.mark.parametrize("message", ROOM_MESSAGES, ids=lambda m: m.name)
def test_each_room_message_is_documented_with_its_fields(
    doc: str, message: type[RoomMessage]
) -> None:
    text = (DOCS / doc).read_text()
    row = next(
        (line for line in text.splitlines() if line.startswith(f"| `{message.name}` |")), None
    )
    assert row is not None, f"{doc} has no row for {message.name}"
    for field in message.model_fields:
        assert f"`{field}`" in row, f"{doc}: {message.name} lacks `{field}`"
