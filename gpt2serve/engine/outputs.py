"""What the engine hands back: one RequestOutput per step in which a request made progress."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # raw log-softmax of the model (no temperature, penalties or bias); finite
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class SequenceOutput:
    index: int  # 0..num_sequences-1 within the request
    # Delta since the previous RequestOutput for this sequence (the engine streams deltas).
    text: str  # new text, safe to show: no broken UTF-8, no held-back partial stop string
    token_ids: list[int]  # new token ids
    logprobs: list[TokenLogprob] | None  # one per new token when params.logprobs is not None
    # Totals so far.
    num_tokens: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    # Only on the first output of a request when params.prompt_logprobs is not None: one entry per
    # prompt token; the first is None (no context to score it).
    prompt_logprobs: list[TokenLogprob | None] | None
    outputs: list[SequenceOutput]  # only the sequences that changed in this step
    finished: bool = False  # every sequence finished; no more outputs follow
    # Timing (monotonic seconds), for metrics and usage records.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
