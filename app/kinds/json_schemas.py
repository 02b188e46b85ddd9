"""JSON Schemas from users: which ones a job may carry, and the validator that runs them.

A user's schema is, in effect, code that a worker runs against the model's output. So it is
checked when the job is submitted for everything that could make that run hang, crash or reach
the network (`check_schema`):

- it is a valid JSON Schema (2020-12), at most `MAX_SCHEMA_CHARS` long and nested at most
  `MAX_NESTING` levels of JSON objects and arrays;
- every `$ref` points at a subschema inside the schema: a worker never fetches one;
- no chain of `$ref`, `allOf`, `anyOf`, `oneOf`, `not`, `if`/`then`/`else` or
  `dependentSchemas` leads back to where it started without descending into the value: the
  validator would recurse until the stack ran out. Recursion through `properties`, `items` and
  the like (a tree) is fine, because each step consumes one level of the value;
- one value is checked against at most `MAX_FAN_OUT` subschemas once those chains are followed
  (`$defs` that each `allOf` the previous one twice double the count at every step);
- every `pattern` and `patternProperties` name compiles with RE2, and the validator matches
  them with RE2, whose running time is linear in the text: `^(a+)+$` cannot backtrack
  catastrophically. RE2 has no backreferences and no lookaround; those patterns are refused,
  and so is `unevaluatedProperties` beside `patternProperties` (see `_SchemaGraph`).

`first_error` checks a value against an accepted schema within `MAX_CHECK_SECONDS` and turns a
stack overflow into `OutputUncheckable`: a recursive schema can still make the work grow
exponentially with the depth of the value (`oneOf` of the same `$ref` twice, at every level),
which no check of the schema alone can see.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import re2
from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

MAX_SCHEMA_CHARS = 50_000
# Levels of JSON objects and arrays, the root being the first: 32 levels of `properties` (each
# is `properties` plus the property's name). OpenAI's structured outputs allow 10 levels of
# object nesting. The bound keeps the recursive meta-schema check, which costs about 10 Python
# frames per level, far from the interpreter's limit of 1,000.
MAX_NESTING = 64
MAX_FAN_OUT = 1_000
# jsonschema spends 10-30 µs per keyword, so an answer of 32k tokens takes a second or two
# against a large schema. The bound stays well inside a lease (30 s by default), which matters
# in a gevent worker, where a busy validator also holds up every other job's heartbeat.
MAX_CHECK_SECONDS = 5.0

Path = tuple[str | int, ...]

# Where each applicator keyword keeps its subschemas, and which ones apply to the same value
# (as opposed to a property or item of it, or, for $defs, to nothing until referenced).
_ONE = {"not", "if", "then", "else", "items", "contains", "additionalProperties"}
_ONE |= {"propertyNames", "unevaluatedItems", "unevaluatedProperties"}
_LIST = {"allOf", "anyOf", "oneOf", "prefixItems"}
_NAMED = {"dependentSchemas", "properties", "patternProperties", "$defs", "definitions"}
_SAME_VALUE = {"not", "if", "then", "else", "allOf", "anyOf", "oneOf", "dependentSchemas"}


class SchemaRefused(ValueError):
    """A schema that a job may not carry; `path` leads to the offending place inside it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{pointer(path)}: {reason}")
        self.path, self.reason = path, reason


class OutputUncheckable(Exception):
    """The validator could not finish checking a value against a schema."""


def pointer(path: Path) -> str:
    """The place as `$ref` would spell it: `#/$defs/a`, or `#` for the root (RFC 6901)."""
    return "#" + "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def check_schema(schema: dict[str, Any]) -> None:
    """Raises `SchemaRefused` unless every worker can run `schema` safely (module docstring)."""
    _check_nesting(schema)
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise SchemaRefused((), f"the schema is larger than {MAX_SCHEMA_CHARS:,} characters")
    error = best_match(_meta_validator().iter_errors(schema))
    if error is not None:
        raise SchemaRefused(tuple(error.absolute_path), f"not a valid JSON Schema: {error.message}")
    _SchemaGraph(schema).check_same_value_chains()


def first_error(schema: dict[str, Any], value: Any) -> ValidationError | None:
    """The first way `value` fails `schema` (one that `check_schema` accepted), or None.

    Raises `OutputUncheckable` when the check would take longer than `MAX_CHECK_SECONDS` or
    more stack than there is, or when the validator fails on the schema.
    """
    token = _deadline.set(time.monotonic() + MAX_CHECK_SECONDS)
    try:
        return next(_Validator(schema, registry=Registry()).iter_errors(value), None)
    except OutputUncheckable:
        raise
    except RecursionError:
        raise OutputUncheckable(
            "the check ran out of stack: the value is nested too deeply, or the schema recurses "
            "without descending into it"
        ) from None
    except Exception as exc:
        # The schema is the user's: whatever it makes the validator raise is about that job.
        raise OutputUncheckable(f"the validator failed: {type(exc).__name__}: {exc}") from None
    finally:
        _deadline.reset(token)


def _check_nesting(schema: Any) -> None:
    # Iterative, unlike everything after it: this is what makes the recursion there safe.
    stack: list[tuple[Any, Path]] = [(schema, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            children = list(value.items())
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            continue
        if len(path) >= MAX_NESTING:
            raise SchemaRefused(path, f"the schema nests deeper than {MAX_NESTING} levels")
        stack.extend((child, (*path, key)) for key, child in reversed(children))


@cache
def _meta_validator() -> Draft202012Validator:
    # Patterns are judged by RE2 (in _SchemaGraph, naming the reason), not by Python's `re`.
    formats = [name for name in Draft202012Validator.FORMAT_CHECKER.checkers if name != "regex"]
    return Draft202012Validator(
        Draft202012Validator.META_SCHEMA, format_checker=FormatChecker(formats)
    )


@cache
def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    return options


def _regex(pattern: str) -> Any:
    return re2.compile(pattern, _re2_options())  # the re2 module caches compiled patterns


class _SchemaGraph:
    """Every subschema of one schema, and which others each applies to the same value."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.paths: dict[int, Path] = {}  # id() of each subschema object -> where it is
        self.same_value: dict[int, list[tuple[int, Path]]] = {}  # -> (subschema, applied at)
        self.unevaluated: list[Path] = []  # where unevaluatedProperties is
        self.pattern_properties = False
        refs: list[tuple[int, Path, Any]] = []  # (subschema, where its $ref is, the target)
        root = Registry().resolver_with_root(DRAFT202012.create_resource(schema))
        stack = [(schema, (), root)]
        while stack:
            node, path, resolver = stack.pop()
            if isinstance(node, dict):  # not true or false
                if "$id" in node:
                    _check_uri(node["$id"], (*path, "$id"))
                    resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
                if "$ref" in node:
                    target = _resolve(resolver, node["$ref"], path)
                    refs.append((id(node), (*path, "$ref"), target))
                children = self._visit(node, path)
                stack.extend((child, at, resolver) for at, child in reversed(children))
        for source, ref_path, target in refs:
            if isinstance(target, bool):
                continue
            if not isinstance(target, dict) or id(target) not in self.paths:
                raise SchemaRefused(ref_path, "the $ref does not point at a subschema")
            self.same_value[source].append((id(target), ref_path))
        if self.unevaluated and self.pattern_properties:
            # jsonschema matches patternProperties for unevaluatedProperties with Python's `re`
            # inside its own helper, out of reach of the RE2 keywords below.
            raise SchemaRefused(
                self.unevaluated[0],
                "unevaluatedProperties cannot be combined with patternProperties",
            )

    def _visit(self, node: dict[str, Any], path: Path) -> list[tuple[Path, Any]]:
        """Records one subschema and checks its own keywords; returns its subschemas."""
        self.paths[id(node)] = path
        _check_patterns(node, path)
        if "$dynamicRef" in node:
            raise SchemaRefused((*path, "$dynamicRef"), "$dynamicRef is not supported; use $ref")
        if "unevaluatedProperties" in node:
            self.unevaluated.append((*path, "unevaluatedProperties"))
        self.pattern_properties = self.pattern_properties or "patternProperties" in node
        children = list(_subschemas(node, path))
        self.same_value[id(node)] = [
            (id(child), at)
            for keyword, at, child in children
            if keyword in _SAME_VALUE and isinstance(child, dict)
        ]
        return [(at, child) for _, at, child in children]

    def check_same_value_chains(self) -> None:
        """Refuses cycles that never descend into the value, and too wide a fan-out."""
        fan_out: dict[int, int] = {}  # subschemas applied to a value that reaches this one
        for start in self.paths:
            if start in fan_out:
                continue
            trail = {start: 0}  # the chain being followed, each node with its position
            stack = [(start, iter(self.same_value[start]))]
            while stack:
                node, edges = stack[-1]
                for target, applied_at in edges:
                    if target in trail:
                        cycle = [*list(trail)[trail[target] :], target]
                        raise SchemaRefused(
                            applied_at,
                            "a cycle that never descends into the value, so checking it would "
                            "never end: " + " → ".join(pointer(self.paths[n]) for n in cycle),
                        )
                    if target not in fan_out:
                        trail[target] = len(trail)
                        stack.append((target, iter(self.same_value[target])))
                        break
                else:
                    stack.pop()
                    del trail[node]
                    total = 1 + sum(fan_out[target] for target, _ in self.same_value[node])
                    if total > MAX_FAN_OUT:
                        raise SchemaRefused(
                            self.paths[node],
                            f"a value here is checked against {total:,} subschemas once $ref, "
                            f"allOf, anyOf and the like are followed; at most {MAX_FAN_OUT:,}",
                        )
                    fan_out[node] = total


def _subschemas(node: dict[str, Any], path: Path) -> Iterator[tuple[str, Path, Any]]:
    # The meta-schema check has made sure each keyword has the shape its set says.
    for keyword, value in node.items():
        if keyword in _ONE:
            yield keyword, (*path, keyword), value
        elif keyword in _LIST:
            for index, child in enumerate(value):
                yield keyword, (*path, keyword, index), child
        elif keyword in _NAMED:
            for name, child in value.items():
                yield keyword, (*path, keyword, name), child


def _check_patterns(node: dict[str, Any], path: Path) -> None:
    places = [((*path, "pattern"), node["pattern"])] if "pattern" in node else []
    for name in node.get("patternProperties", {}):
        places.append(((*path, "patternProperties", name), name))
    for place, pattern in places:
        try:
            _regex(pattern)
        except (re2.error, UnicodeEncodeError) as exc:
            reason = exc.args[0].decode() if isinstance(exc.args[0], bytes) else str(exc)
            raise SchemaRefused(
                place,
                f"RE2 cannot compile the pattern {pattern!r}: {reason} (RE2 runs in linear "
                "time and has no backreferences or lookaround)",
            ) from None


def _check_uri(uri: str, path: Path) -> None:
    try:
        urlsplit(uri)
    except ValueError as exc:
        raise SchemaRefused(path, f"{uri!r} is not a valid URI ({exc})") from None


def _resolve(resolver: Any, ref: str, path: Path) -> Any:
    try:
        return resolver.lookup(ref).contents
    except (Unresolvable, ValueError):
        # The registry holds this schema alone and cannot retrieve: nothing is ever fetched.
        raise SchemaRefused(
            (*path, "$ref"),
            f"{ref!r} points at nothing inside this schema, and a $ref may only point inside it",
        ) from None


# --- the validator: RE2 for patterns, and a deadline checked at every keyword --------------

_deadline: ContextVar[float | None] = ContextVar("json_schema_deadline", default=None)


# jsonschema's own versions of these three keywords match with Python's `re`, which backtracks.


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and _regex(pattern).search(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = _regex(pattern)
        for name, value in instance.items():
            if regex.search(name) is not None:
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    named = schema.get("properties", {})
    patterns = [_regex(pattern) for pattern in schema.get("patternProperties", {})]
    extras = [
        name
        for name in instance
        if name not in named and not any(regex.search(name) for regex in patterns)
    ]
    if validator.is_type(additional, "object"):
        for name in extras:
            yield from validator.descend(instance[name], additional, path=name)
    elif additional is False and extras:
        unexpected = ", ".join(repr(name) for name in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({unexpected} unexpected)")


def _timed(keyword: Any) -> Any:
    def evaluate(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        deadline = _deadline.get()
        if deadline is not None and time.monotonic() > deadline:
            raise OutputUncheckable(f"checking the value took longer than {MAX_CHECK_SECONDS:g} s")
        return keyword(validator, value, instance, schema)

    return evaluate


_KEYWORDS = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
}
_Validator = validators.extend(
    Draft202012Validator,
    validators={name: _timed(keyword) for name, keyword in _KEYWORDS.items()},
)
