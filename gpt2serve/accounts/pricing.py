"""Prices in whole micro-USD per token, so every cost is an exact integer."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


def usd(micros: int) -> str:
    """Exact USD string of a micro-USD amount: 1 -> "0.000001", 2_500_000 -> "2.5", 0 -> "0"."""
    d = Decimal(micros).scaleb(-6)
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def micros_from_usd(text: str) -> int:
    """Parse "5", "0.25" or "$1.000001" into micro-USD; reject finer than a micro-dollar."""
    d = Decimal(text.strip().lstrip("$")) * 1_000_000
    if d != d.to_integral_value():
        raise ValueError(f"{text!r} is finer than one micro-dollar")
    return int(d)


@dataclass(frozen=True)
class Pricing:
    prompt_micros_per_token: int = 1
    completion_micros_per_token: int = 2

    def __post_init__(self) -> None:
        for name in ("prompt_micros_per_token", "completion_micros_per_token"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return prompt_tokens * self.prompt_micros_per_token + completion_tokens * self.completion_micros_per_token

    def openrouter(self) -> dict[str, str]:
        """The `pricing` object of OpenRouter's /models entries: USD per token (or request), as strings."""
        return {
            "prompt": usd(self.prompt_micros_per_token),
            "completion": usd(self.completion_micros_per_token),
            "request": "0",
            "image": "0",
            "web_search": "0",
            "internal_reasoning": "0",
        }
