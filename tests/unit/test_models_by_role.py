"""Models by kind and role, the models a request may name, prices of OpenRouter names, a
response's reported cost, and the declaration of steps."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from app.config import Settings
from app.kinds.base import Kind, Step
from app.llm.client import reported_cost
from app.llm.pricing import PriceTable
from app.sim.directives import NO_COST, DirectiveError, parse_directive_text


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type, call-arg]


def test_the_old_shape_kind_to_model_still_means_every_call_of_the_kind() -> None:
    config = settings(models={"chat": "gpt-4o"}, default_model="gpt-4o-mini")
    assert config.model_for("chat") == "gpt-4o"
    assert config.model_for("chat", "creative") == "gpt-4o"
    assert config.model_for("structured") == "gpt-4o-mini"


def test_roles_map_to_their_models_with_default_for_the_rest() -> None:
    config = settings(
        models={
            "article": {"creative": "anthropic/claude-sonnet-4", "default": "gpt-4o"},
            "card": {"analysis": "google/gemini-2.5-flash"},
        },
        default_model="gpt-4o-mini",
    )
    assert config.model_for("article", "creative") == "anthropic/claude-sonnet-4"
    assert config.model_for("article", "analysis") == "gpt-4o"
    assert config.model_for("article") == "gpt-4o"
    assert config.model_for("card", "analysis") == "google/gemini-2.5-flash"
    assert config.model_for("card", "creative") == "gpt-4o-mini"


def test_both_shapes_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    value = {"chat": "gpt-4o", "article": {"creative": "anthropic/claude-sonnet-4"}}
    monkeypatch.setenv("CONVEYOR_MODELS", json.dumps(value))
    monkeypatch.setenv("CONVEYOR_ALLOWED_MODELS", "google/gemini-2.5-flash, sim-large")
    config = Settings(_env_file=None)  # type: ignore[call-arg]
    assert config.models == value
    assert config.allowed_models == ["google/gemini-2.5-flash", "sim-large"]


def test_a_request_may_name_the_allowed_models_and_the_configured_ones() -> None:
    config = settings(
        models={"chat": "gpt-4o", "article": {"creative": "anthropic/claude-sonnet-4"}},
        allowed_models=["google/gemini-2.5-flash"],
        default_model="gpt-4o-mini",
    )
    assert config.requestable_models() == {
        "google/gemini-2.5-flash",
        "gpt-4o",
        "anthropic/claude-sonnet-4",
        "gpt-4o-mini",
        "gpt-image-1",  # CONVEYOR_IMAGE_MODEL, the image kind's configured model
    }


def test_openrouter_names_are_priced_and_vendor_prefixes_fall_back() -> None:
    prices = PriceTable.load(None)
    assert prices.cost("anthropic/claude-sonnet-4", 1_000_000, 1_000_000) == Decimal("18.00")
    assert prices.cost("google/gemini-2.5-flash", 1_000_000, 0) == Decimal("0.30")
    assert prices.cost("openai/gpt-4o-mini", 1_000_000, 0) == prices.cost("gpt-4o-mini", 10**6, 0)
    assert prices.cost("nobody/unknown-model", 10, 10) == 0


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"cost": 0.00012}, Decimal("0.00012")),
        ({"cost": 0}, Decimal(0)),
        ({"cost": "0.5"}, Decimal("0.5")),
        ({}, None),
        ({"cost": None}, None),
        ({"cost": -1}, None),
        ({"cost": True}, None),
        ({"cost": "NaN"}, None),
        ({"cost": "lots"}, None),
        ({"cost": {"total": 1}}, None),
    ],
)
def test_areported_cost_is_believed_only_when_it_is_a_number(
    usage: dict[str, object], expected: Decimal | None
) -> None:
    assert reported_cost(usage) == expected


def test_the_simulator_reads_cost_and_tag_knobs() -> None:
    knobs, _ = parse_directive_text("[[sim cost=0.25 tag=job-1]]")
    assert knobs.cost == 0.25 and knobs.tag == "job-1"
    assert parse_directive_text("[[sim cost=none]]")[0].cost == NO_COST
    with pytest.raises(DirectiveError):
        parse_directive_text("[[sim cost=-2]]")
    with pytest.raises(DirectiveError):
        parse_directive_text("[[sim tag=" + "x" * 65 + "]]")


def test_steps_are_declared_with_names_roles_and_positive_weights() -> None:
    with pytest.raises(ValueError, match="step name"):
        Step("Outline")
    with pytest.raises(ValueError, match="role"):
        Step("outline", role="Creative Writer")
    with pytest.raises(ValueError, match="weight"):
        Step("outline", weight=0)
    with pytest.raises(ValueError, match="twice"):
        Kind("k", "", object, object, print, (Step("a"), Step("a")))  # type: ignore[arg-type]
    kind = Kind("k", "", object, object, print, (Step("a", "x"), Step("b", "y"), Step("c", "x")))  # type: ignore[arg-type]
    assert kind.roles == ("x", "y")
