"""Cards in PNG files, as TavernAI and SillyTavern keep them: the picture is the portrait, and
tEXt chunks hold the card as base64 of its JSON, `chara` for V2 and `ccv3` for V3.

Reading walks the file's chunks (signature, lengths, CRCs, IHDR first, IEND last) without
decoding the picture: a card's chunks may come after the image data, and decoding pixels only
to reach them would spend the web process's CPU on what it never uses.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from collections.abc import Iterator

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.cards.avatar import placeholder_avatar
from app.cards.convert import to_v3
from app.cards.documents import MAX_CARD_JSON_BYTES, card_json, read_json_card
from app.cards.errors import CardError, Fault
from app.cards.models import CharacterCardV2

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
V2_CHUNK = "chara"
V3_CHUNK = "ccv3"
# Read in this order: V3 first when it is valid, as the V3 spec asks, else V2.
CARD_CHUNKS = (V3_CHUNK, V2_CHUNK)
_HEADER = struct.Struct(">I4s")
_CRC = struct.Struct(">I")
_MAX_CHUNK_LENGTH = 2**31 - 1
# The base64 of the largest card JSON accepted, with room for line breaks some writers add.
_MAX_CARD_TEXT = MAX_CARD_JSON_BYTES * 4 // 3 + 4096


def write_png_card(card: CharacterCardV2, picture: Image.Image | None = None) -> bytes:
    """A PNG of `picture` (default: a placeholder portrait from the card's name) that carries
    the card in a `chara` chunk (V2) and a `ccv3` chunk (V3)."""
    image = picture if picture is not None else placeholder_avatar(card.data.name)
    info = PngInfo()
    info.add_text(V2_CHUNK, _base64(card_json(card)))
    info.add_text(V3_CHUNK, _base64(card_json(to_v3(card))))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read_png_card(data: bytes) -> CharacterCardV2:
    """The card a PNG carries, as V2: its `ccv3` chunk's when that holds a valid card, else
    its `chara` chunk's. Raises `CardError` for a file that is not a PNG, a corrupt or cut PNG,
    one without a card chunk, and a chunk whose card is not base64, JSON or a valid card."""
    texts = card_texts(data)
    if not texts:
        raise CardError(
            Fault.NO_CARD,
            f"the PNG holds no character card (no tEXt chunk named {V2_CHUNK} or {V3_CHUNK})",
        )
    failures: list[CardError] = []
    for chunk in (chunk for chunk in CARD_CHUNKS if chunk in texts):
        try:
            return _card_of_chunk(texts[chunk])
        except CardError as exc:
            failures.append(exc.in_chunk(chunk))
    # Both chunks failed, or the only one did. The fault reported is the last one's: the V2
    # chunk's if there is one, the card every reader falls back to.
    raise failures[-1]


def _card_of_chunk(text: bytes) -> CharacterCardV2:
    if len(text) > _MAX_CARD_TEXT:
        raise CardError(
            Fault.CARD_TOO_LARGE,
            f"the chunk is {len(text)} bytes; a card's JSON may be at most "
            f"{MAX_CARD_JSON_BYTES} bytes",
        )
    try:
        raw = base64.b64decode(b"".join(text.split()), validate=True)
    except binascii.Error as exc:
        raise CardError(Fault.BAD_BASE64, f"the chunk is not base64: {exc}") from None
    return read_json_card(raw)


def card_texts(data: bytes) -> dict[str, bytes]:
    """The text of the first tEXt chunk of each card keyword (lower-cased), by keyword."""
    found: dict[str, bytes] = {}
    for chunk_type, body in chunks(data):
        if chunk_type != b"tEXt":
            continue
        keyword, separator, text = bytes(body).partition(b"\x00")
        if not separator or not 1 <= len(keyword) <= 79:
            raise CardError(Fault.CORRUPT_PNG, "a tEXt chunk has no valid keyword")
        name = keyword.decode("latin-1").lower()
        if name in CARD_CHUNKS:
            found.setdefault(name, text)
    return found


def chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """Each chunk's type and data, up to IEND, each checked against its CRC."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError(Fault.NOT_PNG, "not a PNG image (it does not start with the signature)")
    view = memoryview(data)
    position, index = len(PNG_SIGNATURE), 0
    while True:
        if position + _HEADER.size > len(data):
            raise CardError(Fault.CORRUPT_PNG, f"the PNG is cut short (at byte {position})")
        length, chunk_type = _HEADER.unpack_from(data, position)
        if length > _MAX_CHUNK_LENGTH or not chunk_type.isalpha():
            raise CardError(Fault.CORRUPT_PNG, f"the PNG is corrupt (a bad chunk at {position})")
        start = position + _HEADER.size
        end = start + length
        if end + _CRC.size > len(data):
            raise CardError(
                Fault.CORRUPT_PNG,
                f"the PNG is cut short (in its {chunk_type.decode()} chunk at byte {position})",
            )
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(view[start:end], zlib.crc32(chunk_type)) != crc:
            raise CardError(
                Fault.CORRUPT_PNG,
                f"the PNG is corrupt (its {chunk_type.decode()} chunk at byte {position} "
                "fails its CRC check)",
            )
        if index == 0 and chunk_type != b"IHDR":
            raise CardError(Fault.CORRUPT_PNG, "the PNG is corrupt (its first chunk is not IHDR)")
        yield chunk_type, view[start:end]
        if chunk_type == b"IEND":
            return
        position, index = end + _CRC.size, index + 1
