"""What can be wrong with a card file: one exception, with the kind of fault and the fields."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Fault(StrEnum):
    """Why a file is not a readable card. The values are the API's problem slugs."""

    NOT_PNG = "not-png"
    CORRUPT_PNG = "corrupt-png"
    NO_CARD = "no-card"
    BAD_BASE64 = "bad-base64"
    BAD_JSON = "bad-json"
    CARD_TOO_LARGE = "card-too-large"
    INVALID_CARD = "invalid-card"


@dataclass(frozen=True)
class FieldIssue:
    """One bad field of a card: its dotted path inside the card's JSON (`data.name`,
    `data.character_book.entries.3.keys`), empty for the card as a whole."""

    field: str
    message: str


class CardError(ValueError):
    """A file or document that is not a valid card. `chunk` names the PNG text chunk the card
    came from (`chara`, `ccv3`), if it came from one; `issues` the bad fields, if any."""

    def __init__(
        self,
        fault: Fault,
        message: str,
        issues: tuple[FieldIssue, ...] = (),
        chunk: str | None = None,
    ) -> None:
        self.fault, self.message, self.issues, self.chunk = fault, message, issues, chunk
        super().__init__(self.describe())

    def in_chunk(self, chunk: str) -> CardError:
        return CardError(self.fault, self.message, self.issues, chunk)

    def describe(self) -> str:
        where = f"the card in the {self.chunk} chunk: " if self.chunk else ""
        fields = "; ".join(
            f"{issue.field}: {issue.message}" if issue.field else issue.message
            for issue in self.issues[:5]
        )
        return f"{where}{self.message}" + (f" ({fields})" if fields else "")
