"""The price table of `/v1/organization/costs` (README: Usage and costs), a section of
shared.config's Settings: what the operator charges per model, per million input and output
tokens and/or per GPU-hour of the workers' engine time."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from shared.settings_env import ConfigError, Parse


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True):
    """What one model costs, in the table's currency; 0 = not charged that way."""

    model: str
    input_per_million: float = 0.0
    output_per_million: float = 0.0
    per_gpu_hour: float = 0.0


def _amount(name: str, model: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: price of {model!r} is not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}: price of {model!r} must be a number >= 0, got {text!r}")
    return value


def parse_prices(name: str, value: str) -> tuple[ModelPrice, ...]:
    """`MODEL=IN/OUT` (per million input / output tokens) or `MODEL=PRICE/h` (per GPU-hour),
    comma-separated; a model may have both entries. A model name may hold `/` (it ends at the
    last `=`)."""
    prices: dict[str, ModelPrice] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        model, eq, price = item.rpartition("=")
        model = model.strip()
        if not eq or not model:
            raise ConfigError(f"{name}: {item!r} is not MODEL=IN/OUT or MODEL=PRICE/h")
        known = prices.get(model, ModelPrice(model=model))
        first, slash, second = (p.strip() for p in price.partition("/"))
        if not slash:
            raise ConfigError(f"{name}: {item!r} is not MODEL=IN/OUT or MODEL=PRICE/h")
        if second.lower() == "h":
            prices[model] = msgspec.structs.replace(known, per_gpu_hour=_amount(name, model, first))
        else:
            prices[model] = msgspec.structs.replace(
                known,
                input_per_million=_amount(name, model, first),
                output_per_million=_amount(name, model, second),
            )
    return tuple(prices.values())


def prices_text(prices: tuple[ModelPrice, ...]) -> str:
    items: list[str] = []
    for p in prices:
        if p.input_per_million or p.output_per_million:
            items.append(f"{p.model}={p.input_per_million:g}/{p.output_per_million:g}")
        if p.per_gpu_hour:
            items.append(f"{p.model}={p.per_gpu_hour:g}/h")
    return ",".join(items)


PRICES = Parse(
    parse_prices,
    "MODEL=IN/OUT (per million input/output tokens) or MODEL=PRICE/h (per GPU-hour),"
    " comma-separated",
    show=prices_text,
)


class UsageSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What `/v1/organization/costs` charges (README: Usage and costs)."""

    env_prefix: ClassVar[str] = ""

    prices: Annotated[
        tuple[ModelPrice, ...],
        Meta(
            description="price table of `/v1/organization/costs`, per model: per million input"
            " and output tokens (`MODEL=IN/OUT`) and/or per GPU-hour of engine time"
            " (`MODEL=PRICE/h`), e.g. `SmolLM2-135M-Instruct=0.05/0.20,all-MiniLM-L6-v2=2.5/h`;"
            " a model not listed costs nothing",
            extra={"unset": "no prices: every cost is 0"},
        ),
        PRICES,
    ] = ()
    currency: Annotated[
        str,
        Meta(
            pattern="^[a-z]{3}$",
            description="lowercase ISO-4217 currency of the price table (costs' `amount.currency`)",
            extra={"env": "JETBATCH_PRICES_CURRENCY"},
        ),
    ] = "usd"

    def price(self, model: str) -> ModelPrice | None:
        return next((p for p in self.prices if p.model == model), None)
