"""An independent reader: the npm packages SillyTavern reads card PNGs with
(`png-chunks-extract`, `png-chunk-text`), run by Node on a PNG that app/cards wrote. `make`
installs them (`npm ci` in tests/node_reader)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.cards import card_json, to_v3, write_png_card
from tests.cardfiles import card_document, full_card

READER = Path(__file__).resolve().parents[1] / "node_reader"


def read_with_node(path: Path) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run `tools/require npm`", pytrace=False)
    if not (READER / "node_modules" / "png-chunks-extract").is_dir():
        pytest.fail(
            f"the reader's packages are missing: run `make` (or `npm ci` in {READER})",
            pytrace=False,
        )
    result = subprocess.run(
        [node, str(READER / "read_card.js"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    cards: dict[str, Any] = json.loads(result.stdout)
    return cards


def test_sillytavern_s_chunk_readers_decode_the_card_app_cards_wrote(tmp_path: Path) -> None:
    card = full_card()
    path = tmp_path / "card.png"
    path.write_bytes(write_png_card(card))
    cards = read_with_node(path)
    assert cards["chara"] == card_document(card)
    assert cards["ccv3"] == json.loads(card_json(to_v3(card)))


def test_the_reader_sees_a_different_card_as_different(tmp_path: Path) -> None:
    """The comparison above can fail: another card's PNG decodes to another card."""
    path = tmp_path / "other.png"
    path.write_bytes(write_png_card(full_card("Grace Hopper")))
    assert read_with_node(path)["chara"] != card_document(full_card())
