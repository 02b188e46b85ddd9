"""A job's input from the command line: `--input` JSON, `--set key=value`, and named flags for
the fields of the kinds (`--prompt`, `--concept`, `--lorebook-entries`, …).

Each named flag stores its field into the context as it is parsed, so `submit` takes any
kind's flags without a parameter per field; the API validates them, and a 422 names the flag
beside the field."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

FIELDS_KEY = "conveyor.input_fields"
# field -> the flag that sets it, to name the flag when the API rejects the field.
FLAGS: dict[str, str] = {}


def input_flag(
    flag: str, field: str, convert: Callable[[Any], Any] | None = None, **kwargs: Any
) -> Callable[[Any], Any]:
    def store(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is None or value == ():
            return
        ctx.meta.setdefault(FIELDS_KEY, {})[field] = convert(value) if convert else value

    FLAGS[field] = flag
    return click.option(flag, expose_value=False, callback=store, **kwargs)


def load_json(value: str) -> Any:
    """JSON text, or the JSON in a file for `@path`."""
    try:
        raw = Path(value[1:]).read_text() if value.startswith("@") else value
        return json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None


CARD = "character_card: "
INPUT_FLAGS = (
    input_flag("--prompt", "prompt", help="The prompt (chat and structured)."),
    input_flag(
        "--schema",
        "schema",
        convert=lambda path: load_json("@" + path),
        type=click.Path(exists=True, dir_okay=False),
        help="JSON Schema file (structured).",
    ),
    input_flag("--concept", "concept", help=CARD + "who the character is."),
    input_flag("--name", "name", help=CARD + "their name."),
    input_flag("--genre", "genre", help=CARD + "the genre."),
    input_flag("--setting", "setting", help=CARD + "the setting or world."),
    input_flag("--tone", "tone", help=CARD + "the tone."),
    input_flag(
        "--point-of-view",
        "point_of_view",
        type=click.Choice(["first", "second", "third"]),
        help=CARD + "the person the messages are written in.",
    ),
    input_flag("--language", "language", help=CARD + "the card's language."),
    input_flag("--lorebook-entries", "lorebook_entries", type=int, help=CARD + "0 to 50."),
    input_flag("--alternate-greetings", "alternate_greetings", type=int, help=CARD + "0 to 10."),
    input_flag(
        "--content-rating",
        "content_rating",
        type=click.Choice(["sfw", "nsfw"]),
        help=CARD + "sfw or nsfw.",
    ),
    input_flag("--tag", "tags", convert=list, multiple=True, help=CARD + "a tag (repeatable)."),
    input_flag("--creator", "creator", help=CARD + "the creator's name."),
)


def input_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag in reversed(INPUT_FLAGS):
        command = flag(command)
    return command


def job_input(input_json: str | None, assignments: tuple[str, ...]) -> dict[str, Any]:
    """`--input` first, then each `--set` in order, then the named flags."""
    value = load_json(input_json) if input_json else {}
    if not isinstance(value, dict):
        raise click.BadParameter("the input must be a JSON object", param_hint="--input")
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{assignment!r} is not key=value", param_hint="--set")
        set_path(value, key.split("."), parse_value(text))
    value.update(click.get_current_context().meta.get(FIELDS_KEY, {}))
    return value


def parse_value(text: str) -> Any:
    """JSON when it is JSON (`5`, `true`, `["a"]`), else the text as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        inner = target.get(key)
        target = target.setdefault(key, {}) if inner is None else inner
        if not isinstance(target, dict):
            raise click.BadParameter(f"{key} is not an object", param_hint="--set")
    target[path[-1]] = value


def name_flags(problem_text: str) -> str:
    """Adds the flag beside each input field a problem names: `input.lorebook_entries
    (--lorebook-entries): …`."""

    def flagged(match: re.Match[str]) -> str:
        flag = FLAGS.get(match.group(2))
        return f"{match.group(0)} ({flag})" if flag else match.group(0)

    return re.sub(r"(?m)^(\s*)input\.(\w+)(?=:)", flagged, problem_text)
