"""Deterministic answer text and JSON instances.

Everything here is a pure function of its inputs (a seed derived from the request's messages),
so the same request always gets the same answer: tests can compare a streamed answer with a
non-streamed one, and a retried job sees the text it would have seen the first time.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from app.sim.vocabulary import WORDS

MIN_ANSWER_TOKENS = 24
MAX_ANSWER_TOKENS = 96
# Tokens of framing OpenAI counts per chat message; the exact value only needs to be stable.
TOKENS_PER_MESSAGE = 4

# A piece is a run of word characters or a run of punctuation, with the whitespace before it,
# so that "".join(pieces) gives the text back exactly.
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s]+)|\s+$")


def seed_for(messages: Any) -> int:
    """A 64-bit seed from the messages as received (key order does not matter)."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string or a list of content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_token_count(messages: Sequence[Mapping[str, Any]]) -> int:
    """Words across all message contents plus a fixed framing cost per message."""
    return sum(len(message_text(message).split()) + TOKENS_PER_MESSAGE for message in messages)


def answer_length(seed: int) -> int:
    """The natural answer length for a seed, in [MIN_ANSWER_TOKENS, MAX_ANSWER_TOKENS]."""
    return MIN_ANSWER_TOKENS + seed % (MAX_ANSWER_TOKENS - MIN_ANSWER_TOKENS + 1)


def text_tokens(seed: int, count: int) -> list[str]:
    """`count` tokens of sentence-like text; each token is one word with its leading space."""
    rng = random.Random(seed)
    tokens: list[str] = []
    words_left_in_sentence = 0
    for index in range(count):
        word = rng.choice(WORDS)
        if words_left_in_sentence == 0:
            word = word.capitalize()
            words_left_in_sentence = rng.randint(5, 14)
        words_left_in_sentence -= 1
        if words_left_in_sentence == 0:
            word += "."
        elif rng.random() < 0.08:
            word += ","
        tokens.append(word if index == 0 else " " + word)
    # End on a full stop so the whole answer reads as finished prose.
    if tokens and not tokens[-1].endswith("."):
        tokens[-1] = tokens[-1].rstrip(",") + "."
    return tokens


def split_pieces(text: str) -> list[str]:
    """Token-sized pieces of any text (used to stream JSON); they join back to `text`."""
    return _PIECE.findall(text)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


# --- JSON instances -------------------------------------------------------------------------

# Below this depth optional properties are dropped and arrays shrink to minItems, so that
# recursive schemas ($ref to themselves) still give a finite instance.
_MAX_DEPTH = 6
_DEFAULT_SPAN = 100


def json_instance(schema: Any, seed: int) -> Any:
    """A deterministic value that validates against `schema` (JSON Schema, OpenAI subset).

    Supported: type (one or a list), enum, const, properties, required, items, prefixItems,
    minItems/maxItems, uniqueItems, minimum/maximum (and exclusive ones), multipleOf,
    minLength/maxLength, common formats, anyOf/oneOf (first branch), allOf (merged), and $ref
    to #/$defs or #/definitions. `pattern` is not supported.
    """
    return _InstanceBuilder(schema, random.Random(seed)).build(schema, 0)


class _InstanceBuilder:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def build(self, schema: Any, depth: int) -> Any:
        if schema is True:
            return None
        if not isinstance(schema, Mapping):
            return None
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self.rng.choice(schema["enum"])
        for keyword in ("anyOf", "oneOf"):
            if schema.get(keyword):
                rest = {k: v for k, v in schema.items() if k != keyword}
                return self.build({**rest, **self.resolve(schema[keyword][0])}, depth)
        if schema.get("allOf"):
            return self.build(self.merge_all_of(schema), depth)
        kind = self.type_of(schema)
        builder = getattr(self, f"build_{kind}", None)
        return builder(schema, depth) if builder else None

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow local $refs; sibling keywords of a $ref are kept and win."""
        seen = 0
        while "$ref" in schema and seen < 32:
            target = self.pointer(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, Mapping) else rest
            seen += 1
        return schema

    def pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node = self.root
        for raw in ref[1:].split("/")[1:]:
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping):
                node = node.get(key, {})
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return {}
        return node

    def merge_all_of(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for raw_part in schema["allOf"]:
            part = self.resolve(raw_part) if isinstance(raw_part, Mapping) else {}
            properties = {**merged.get("properties", {}), **part.get("properties", {})}
            required = [*merged.get("required", []), *part.get("required", [])]
            merged.update(part)
            if properties:
                merged["properties"] = properties
            if required:
                merged["required"] = list(dict.fromkeys(required))
        return merged

    @staticmethod
    def type_of(schema: Mapping[str, Any]) -> str:
        declared = schema.get("type")
        if isinstance(declared, list):
            # Prefer a concrete type over null so the instance carries some content.
            concrete = [t for t in declared if t != "null"]
            return concrete[0] if concrete else "null"
        if isinstance(declared, str):
            return declared
        if {"properties", "required", "additionalProperties"} & schema.keys():
            return "object"
        if {"items", "prefixItems", "minItems", "maxItems"} & schema.keys():
            return "array"
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
            return "number"
        return "string"

    def build_object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties", {})
        required = list(schema.get("required", []))
        names = [name for name in properties if depth < _MAX_DEPTH or name in required]
        result = {name: self.build(properties[name], depth + 1) for name in names}
        extra = schema.get("additionalProperties")
        for name in required:
            if name not in result:
                value_schema = extra if isinstance(extra, Mapping) else {"type": "string"}
                result[name] = self.build(value_schema, depth + 1)
        return result

    def build_array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items", {})
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        result = [self.build(part, depth + 1) for part in prefix or []]
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(low, len(result)) + 3))
        if depth >= _MAX_DEPTH:
            target = max(low, len(result))
        else:
            floor = max(low, len(result), 1 if high >= 1 else 0)
            target = self.rng.randint(floor, max(floor, min(high, floor + 2)))
        unique = bool(schema.get("uniqueItems"))
        attempts = 0
        while len(result) < target and attempts < target * 8 + 8:
            attempts += 1
            item = self.build(items, depth + 1)
            if unique and item in result:
                continue
            result.append(item)
        return result

    def build_string(self, schema: Mapping[str, Any], depth: int) -> str:
        rng = self.rng
        formatted = _formatted_string(schema.get("format"), rng)
        if formatted is not None:
            return formatted
        min_length = int(schema.get("minLength", 0))
        max_length = int(schema.get("maxLength", max(min_length, 1) + 60))
        text = words(rng, rng.randint(1, 4))
        while len(text) < min_length:
            text += " " + words(rng, 1)
        text = text[:max_length]
        # Trimming may leave a trailing space, which is valid but looks odd; pad instead.
        if text.endswith(" "):
            text = text[:-1] + "x"
        return text

    def build_integer(self, schema: Mapping[str, Any], depth: int) -> int:
        lowest, highest = _integer_bounds(schema)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first = -(-lowest // step) * step
            last = highest // step * step
            if first > last:
                return first
            return first + step * self.rng.randint(0, (last - first) // step)
        return self.rng.randint(lowest, max(lowest, highest))

    def build_number(self, schema: Mapping[str, Any], depth: int) -> float | int:
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
            # A whole multiple of the step, drawn among the multiples inside the bounds.
            scaled = {
                k: v / step if isinstance(v, int | float) and not isinstance(v, bool) else v
                for k, v in schema.items()
                if k in _BOUND_KEYWORDS
            }
            lowest, highest = _integer_bounds(scaled)
            value = self.rng.randint(lowest, max(lowest, highest)) * step
            return int(value) if float(value).is_integer() else value
        low, high = _bounds(schema)
        value = round(self.rng.uniform(low, high), 2)
        outside = not low <= value <= high
        if outside or _excluded(schema, "exclusiveMinimum", value):
            value = (low + high) / 2
        if _excluded(schema, "exclusiveMaximum", value):
            value = (low + high) / 2
        return value

    def build_boolean(self, schema: Mapping[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def build_null(self, schema: Mapping[str, Any], depth: int) -> None:
        return None


_BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_bounds(schema: Mapping[str, Any]) -> tuple[int, int]:
    """The inclusive integer range allowed by the numeric bounds."""
    low, high = _bounds(schema)
    lowest, highest = math.ceil(low), math.floor(high)
    if _excluded(schema, "exclusiveMinimum", lowest):
        lowest += 1
    if _excluded(schema, "exclusiveMaximum", highest):
        highest -= 1
    return lowest, highest


def _bounds(schema: Mapping[str, Any]) -> tuple[float, float]:
    """The inclusive numeric range to draw from, defaulting to a span of 100 near the bounds."""
    low = _numeric(schema.get("minimum"), schema.get("exclusiveMinimum"))
    high = _numeric(schema.get("maximum"), schema.get("exclusiveMaximum"))
    if low is None and high is None:
        return 0, _DEFAULT_SPAN
    if low is None:
        assert high is not None
        return min(0, high - _DEFAULT_SPAN), high
    if high is None:
        return low, low + _DEFAULT_SPAN
    return low, high


def _numeric(inclusive: Any, exclusive: Any) -> float | None:
    # Booleans are the draft-4 form of exclusive bounds; only numbers carry a bound.
    values = [
        v for v in (inclusive, exclusive) if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return values[0] if len(values) == 1 else (max(values) if values else None)


def _excluded(schema: Mapping[str, Any], keyword: str, value: float) -> bool:
    bound = schema.get(keyword)
    if bound is True:  # draft 4: the plain bound is exclusive
        plain = schema.get("minimum" if keyword == "exclusiveMinimum" else "maximum")
        return plain == value
    return isinstance(bound, int | float) and not isinstance(bound, bool) and bound == value


def _formatted_string(fmt: Any, rng: random.Random) -> str | None:
    if fmt == "date-time":
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z"
    if fmt == "date":
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"
    if fmt == "email":
        return f"{rng.choice(WORDS)}@example.com"
    if fmt in ("uri", "url"):
        return f"https://example.com/{rng.choice(WORDS)}"
    if fmt == "uuid":
        hexdigits = f"{rng.getrandbits(128):032x}"
        parts = (hexdigits[:8], hexdigits[8:12], hexdigits[12:16], hexdigits[16:20], hexdigits[20:])
        return "-".join(parts)
    return None


# --- deliberately wrong output (faults) -----------------------------------------------------

_MISMATCH_CANDIDATES: tuple[Any, ...] = (
    {},
    [],
    "mismatch",
    -1,
    None,
    {"unexpected": ["mismatch"]},
)


def schema_mismatch_instance(schema: Any) -> Any:
    """Valid JSON that does NOT validate against `schema` (or `{}` if nothing fails it)."""
    from jsonschema.validators import validator_for

    try:
        validator = validator_for(schema)(schema)
        for candidate in _MISMATCH_CANDIDATES:
            if not validator.is_valid(candidate):
                return candidate
    except Exception:  # a schema jsonschema cannot compile: any candidate is as good
        return _MISMATCH_CANDIDATES[0]
    return _MISMATCH_CANDIDATES[0]


def broken_json(valid_text: str) -> str:
    """Text that is not valid JSON: the valid document cut off about halfway."""
    cut = valid_text[: max(1, len(valid_text) // 2)]
    try:
        json.loads(cut)
    except ValueError:
        return cut
    return '{"truncated": ' + cut
