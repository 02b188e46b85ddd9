"""The OpenAPI document, against a stored snapshot: any change to a route, a model or a
description shows up here as a diff to review. Regenerate the snapshot after an intended change
with `UPDATE_OPENAPI_SNAPSHOT=1 pytest tests/integration/test_openapi.py`."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app.api.openapi import build_document

SNAPSHOT = Path(__file__).parent.parent / "snapshots" / "openapi.json"
UPDATE_VARIABLE = "UPDATE_OPENAPI_SNAPSHOT"


def serialized(document: dict[str, Any]) -> str:
    # Key order kept, not sorted: it is the order of the /docs page, so a change in it is a diff.
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def test_the_document_matches_the_snapshot(app: Flask) -> None:
    generated = serialized(build_document(app))
    if os.environ.get(UPDATE_VARIABLE) == "1":
        SNAPSHOT.write_text(generated, encoding="utf-8")
        pytest.skip(f"{SNAPSHOT} regenerated")
    if not SNAPSHOT.exists():
        pytest.fail(f"no snapshot at {SNAPSHOT}: run with {UPDATE_VARIABLE}=1", pytrace=False)
    stored = SNAPSHOT.read_text(encoding="utf-8")
    if generated != stored:
        diff = difflib.unified_diff(
            stored.splitlines(keepends=True),
            generated.splitlines(keepends=True),
            fromfile="tests/snapshots/openapi.json",
            tofile="generated",
        )
        pytest.fail(
            "the OpenAPI document differs from its snapshot; if the change is intended, "
            f"rerun with {UPDATE_VARIABLE}=1 and commit the snapshot\n\n{''.join(diff)}",
            pytrace=False,
        )


def test_the_served_document_is_the_generated_one(app: Flask) -> None:
    served = app.test_client().get("/api/v1/openapi.json")
    assert served.status_code == 200
    assert served.get_json() == build_document(app)
