"""Cost of a model call: USD per million input and output tokens.

The defaults are list prices of common models, under OpenAI's names (`gpt-4o-mini`) and
OpenRouter's (`anthropic/claude-sonnet-4`, `google/gemini-2.5-flash`); a name with a vendor
prefix that is not in the table is priced as the name after the prefix (`openai/gpt-4o` as
`gpt-4o`). A JSON file named by `CONVEYOR_PRICING_FILE`
(`{"model-name": {"input": 0.15, "output": 0.60}}`) adds models or overrides them.

Image models are priced per image by size (`{"gpt-image-1": {"per_image": {"1024x1024": 0.042,
"*": 0.063}}}` in the same file; `*` is any other size). ComfyUI images are priced by the GPU
time they took (`CONVEYOR_COMFYUI_USD_PER_GPU_SECOND`), not here. A model with
no price costs 0 and is logged once, so an operator notices instead of a job failing.

A provider that reports each call's cost itself (OpenRouter's `usage.cost`) is believed over
this table: the table's figure is still recorded beside it, and the job's total counts the
reported one (app/jobs/transitions.py, `call_cost`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

logger = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    input: Decimal
    output: Decimal

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        return (self.input * tokens_in + self.output * tokens_out) / MILLION


def _price(input_usd: str, output_usd: str) -> Price:
    return Price(Decimal(input_usd), Decimal(output_usd))


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-mini": _price("0.15", "0.60"),
    "gpt-4o": _price("2.50", "10.00"),
    "gpt-4.1": _price("2.00", "8.00"),
    "gpt-4.1-mini": _price("0.40", "1.60"),
    "gpt-4.1-nano": _price("0.10", "0.40"),
    "o3-mini": _price("1.10", "4.40"),
    "o4-mini": _price("1.10", "4.40"),
    "gpt-3.5-turbo": _price("0.50", "1.50"),
    # OpenRouter's names (its list prices; `openai/...` falls back to the names above).
    "anthropic/claude-sonnet-4": _price("3.00", "15.00"),
    "anthropic/claude-3.7-sonnet": _price("3.00", "15.00"),
    "anthropic/claude-opus-4": _price("15.00", "75.00"),
    "anthropic/claude-3.5-haiku": _price("0.80", "4.00"),
    "google/gemini-2.5-flash": _price("0.30", "2.50"),
    "google/gemini-2.5-pro": _price("1.25", "10.00"),
    "google/gemini-2.0-flash-001": _price("0.10", "0.40"),
    # The simulator's own models, priced like a small hosted model so demos show real figures.
    "sim-small": _price("0.15", "0.60"),
    "sim-large": _price("2.50", "10.00"),
}

# USD per image by size (OpenAI's list prices; gpt-image-1 at medium quality).
DEFAULT_IMAGE_PRICES: dict[str, dict[str, Decimal]] = {
    "gpt-image-1": {
        "1024x1024": Decimal("0.042"),
        "1024x1536": Decimal("0.063"),
        "1536x1024": Decimal("0.063"),
        "*": Decimal("0.063"),
    },
    "dall-e-3": {
        "1024x1024": Decimal("0.04"),
        "1024x1792": Decimal("0.08"),
        "1792x1024": Decimal("0.08"),
        "*": Decimal("0.08"),
    },
    "dall-e-2": {
        "256x256": Decimal("0.016"),
        "512x512": Decimal("0.018"),
        "1024x1024": Decimal("0.02"),
        "*": Decimal("0.02"),
    },
}


class PricingError(ValueError):
    pass


class PriceTable:
    def __init__(
        self, prices: dict[str, Price], image_prices: dict[str, dict[str, Decimal]] | None = None
    ) -> None:
        self._prices = prices
        self._image_prices = image_prices or {}
        self._warned: set[str] = set()

    @classmethod
    def load(cls, path: Path | None) -> PriceTable:
        prices = dict(DEFAULT_PRICES)
        image_prices = dict(DEFAULT_IMAGE_PRICES)
        if path is not None:
            token_prices, per_image = read_price_file(path)
            prices.update(token_prices)
            image_prices.update(per_image)
        return cls(prices, image_prices)

    def image_cost(self, model: str, size: str, count: int) -> Decimal:
        """`count` images of `size` ("WxH") from `model`; 0 (logged once) when unpriced."""
        table = self._image_prices.get(model)
        if table is None and "/" in model:
            table = self._image_prices.get(model.split("/", 1)[1])
        price = None if table is None else table.get(size, table.get("*"))
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                logger.warning("no image price for model %r: its images are recorded at $0", model)
            return Decimal(0)
        return price * count

    def price_of(self, model: str) -> Price | None:
        price = self._prices.get(model)
        if price is None and "/" in model:
            price = self._prices.get(model.split("/", 1)[1])
        return price

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> Decimal:
        price = self.price_of(model)
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                logger.warning("no price for model %r: its calls are recorded at $0", model)
            return Decimal(0)
        return price.cost(tokens_in, tokens_out)


def read_price_file(path: Path) -> tuple[dict[str, Price], dict[str, dict[str, Decimal]]]:
    """The file's token prices and its per-image prices."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PricingError(f"cannot read pricing file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise PricingError(f"{path}: expected an object of model -> {{input, output}}")
    prices: dict[str, Price] = {}
    image_prices: dict[str, dict[str, Decimal]] = {}
    for model, entry in raw.items():
        try:
            if isinstance(entry, dict) and "per_image" in entry:
                image_prices[model] = {
                    size: Decimal(str(usd)) for size, usd in entry["per_image"].items()
                }
            else:
                prices[model] = Price(Decimal(str(entry["input"])), Decimal(str(entry["output"])))
        except (KeyError, TypeError, AttributeError, ArithmeticError) as exc:
            raise PricingError(f"{path}: bad price for {model!r}: {exc}") from exc
    return prices, image_prices
