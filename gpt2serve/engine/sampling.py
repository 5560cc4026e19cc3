"""SamplingParams: what one request asks of the sampler, validated once at the edge.

The HTTP layer maps OpenAI's request fields onto this; the engine never sees HTTP types.
Validation raises `ValueError(param, message)` through `SamplingParams.validate()`, which the API
turns into a 400 naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ParamError(ValueError):
    """An invalid request parameter; `param` names it in OpenAI's error shape."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens per sequence; 0 is allowed (echo / scoring only)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: additive, once per token present in the output
    frequency_penalty: float = 0.0  # OpenAI: additive, times the token's count in the output
    repetition_penalty: float = 1.0  # CTRL/HF: divides positive logits of seen tokens (prompt + output)
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None  # same seed -> same text, whatever else is in the batch
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many tokens exist
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # stop text is never returned
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-k alternatives for each sampled token (None = no logprobs)
    prompt_logprobs: int | None = None  # same for the prompt tokens (echo); None = not computed
    n: int = 1  # sequences returned
    best_of: int | None = None  # sequences generated (>= n); the n with the best cumulative logprob are returned

    @property
    def num_sequences(self) -> int:
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, max_logprobs: int = 20) -> "SamplingParams":
        def finite(name: str, v: float) -> None:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ParamError(name, f"{name} must be a finite number, got {v!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ParamError("max_tokens", f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            finite(name, getattr(self, name))
        if not 0.0 <= self.temperature <= 2.0:
            raise ParamError("temperature", f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ParamError("top_k", f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ParamError(name, f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ParamError("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or not 0 <= tok < vocab_size:
                raise ParamError("logit_bias", f"logit_bias key {tok!r} is not a token id in [0, {vocab_size})")
            finite("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise ParamError("logit_bias", f"logit_bias values must be between -100 and 100, got {bias}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise ParamError("seed", f"seed must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ParamError("min_tokens", f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ParamError("stop", "stop strings must be non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ParamError("stop_token_ids", f"stop token id {t!r} is not in [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= max_logprobs):
                raise ParamError(name, f"{name} must be an integer between 0 and {max_logprobs}, got {v!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ParamError("n", f"n must be a positive integer, got {self.n!r}")
        if self.best_of is not None:
            if not isinstance(self.best_of, int) or self.best_of < self.n:
                raise ParamError("best_of", f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
            if self.best_of > 1 and self.greedy:
                raise ParamError("best_of", "best_of > 1 needs temperature > 0 (greedy sequences would be identical)")
        # n > 1 with temperature 0 is allowed, as OpenAI does: n identical choices
        if self.num_sequences > 128:
            raise ParamError("n" if self.best_of is None else "best_of", "at most 128 sequences per prompt")
        return self
