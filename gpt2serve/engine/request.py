"""Request and Sequence: the engine's per-request state (pure Python, no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gpt2serve.engine.outputs import TokenLogprob
from gpt2serve.engine.sampling import SamplingParams


class Status(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    # everything from here on is finished
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4


FINISH_REASON = {Status.FINISHED_STOPPED: "stop", Status.FINISHED_LENGTH: "length", Status.FINISHED_ABORTED: "abort"}


class Sequence:
    """One generated sequence. The first sequence of a request prefills the prompt; the other
    n/best_of - 1 are forked from it once the prompt is in the cache, sharing its full blocks."""

    def __init__(self, seq_id: int, request: "Request", index: int, token_ids: list[int]):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids = token_ids  # prompt + output
        self.num_prompt = len(request.prompt_token_ids)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.blocks: list[int] = []
        self.status = Status.WAITING
        self.stop_reason: str | int | None = None
        self.cumulative_logprob = 0.0
        # detokenization and streaming state
        self.detok = None  # IncrementalDetokenizer, set by the engine
        self.text = ""  # all text decoded so far (may include a held-back partial stop string)
        self.emitted = 0  # characters of `text` already handed out
        self.pending_ids: list[int] = []  # new ids since the last output
        self.pending_logprobs: list[TokenLogprob] = []
        self.final_sent = False  # the output carrying finish_reason went out
        self.generator = None  # torch.Generator for seeded sampling (set by the runner)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def finished(self) -> bool:
        return self.status >= Status.FINISHED_STOPPED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_prompt

    def finish(self, status: Status, stop_reason: str | int | None = None) -> None:
        if not self.finished:
            self.status = status
            self.stop_reason = stop_reason


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    reserve_blocks: list[int] = field(default_factory=list)  # held for the forked sequences
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finished for s in self.seqs) and (
            len(self.seqs) == self.params.num_sequences or self.aborted
        )
