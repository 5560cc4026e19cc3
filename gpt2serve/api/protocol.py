"""OpenAI's HTTP types as pydantic models, in the field order of the official API reference.

Requests: https://platform.openai.com/docs/api-reference/completions/create and
https://platform.openai.com/docs/api-reference/chat/create. Fields this server adds (vLLM's names,
so clients written for vLLM work unchanged) sit between `--8<-- [start:extras]` / `[end:extras]`
markers. Unknown fields are accepted and ignored (logged at debug), as OpenAI's SDKs send fields
older servers don't know. Cross-field checks are `model_validator`s; numeric ranges are `Field`
constraints so they show in /openapi.json; the engine's `SamplingParams.validate` checks again.

The chat template (a base model has none of its own) is defined here, next to the request type:
see `render_chat`.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from gpt2serve.engine.sampling import ParamError, SamplingParams

logger = logging.getLogger(__name__)

# Largest k of alternatives per token: OpenAI's limits for each endpoint.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
# logprobs JSON never carries -inf/NaN (invalid JSON); -inf (a banned token) is clamped to this.
LOGPROB_FLOOR = -9999.0


class OpenAIBaseModel(BaseModel):
    # NOTE: extra="allow" (not "ignore") so that we can log what we ignore; idea from FastChat/vLLM.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="after")
    def _log_extra_fields(self):
        if self.model_extra:
            logger.debug("ignoring unknown fields of %s: %s", type(self).__name__, sorted(self.model_extra))
        return self


def _one_of(message: str):
    """A wrap validator for union fields: one readable error instead of one per union member."""

    def check(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(message) from None

    return check


TokenIds = list[Annotated[int, Field(ge=0)]]
PromptType = Union[str, list[str], TokenIds, list[TokenIds]]
StopType = Union[str, list[str], None]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


# ---------------------------------------------------------------------------- /v1/completions


class CompletionRequest(OpenAIBaseModel):
    model: str
    prompt: PromptType = Field(
        description="A string, an array of strings, an array of token ids, or an array of arrays of token ids. "
        "Each element of a batch becomes its own choices (index = prompt_index * n + i)."
    )
    best_of: int | None = Field(default=None, ge=1, le=128)
    echo: bool | None = False
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=0)
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: StopType = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(default=None, description="Not supported by GPT-2 (no fill-in-the-middle); must be absent or null.")
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --8<-- [start:extras]  (vLLM sampling extensions)
    top_k: int | None = Field(default=None, ge=-1, description="Keep the k most likely tokens; 0 or -1 = off.")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="Drop tokens below min_p * p(best).")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0, description="CTRL-style penalty on seen tokens.")
    min_tokens: int | None = Field(default=None, ge=0, description="EOS and stop tokens are suppressed until this many tokens.")
    ignore_eos: bool | None = Field(default=None, description="Keep generating past <|endoftext|>.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, description="Token ids that end a sequence.")
    include_stop_str_in_output: bool | None = Field(default=None, description="Return the matched stop string.")
    # --8<-- [end:extras]

    _check_prompt = field_validator("prompt", mode="wrap")(
        _one_of("prompt must be a string, an array of strings, an array of token ids, or an array of arrays of token ids")
    )
    _check_stop = field_validator("stop", mode="wrap")(_one_of("stop must be a string, an array of strings, or null"))

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.suffix is not None:
            raise ParamError("suffix", "suffix is not supported: GPT-2 has no fill-in-the-middle mode")
        _check_stream_options(self.stream, self.stream_options)
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError("best_of", f"best_of ({self.best_of}) must be greater than or equal to n ({self.n})")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ParamError("best_of", "best_of > n cannot be streamed (the best sequences are known only at the end)")
        return self

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters. `max_tokens` None means OpenAI's default of 16."""
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=_logit_bias(self.logit_bias),
            seed=self.seed,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            stop=_stop_list(self.stop),
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            logprobs=self.logprobs,
            # echo + logprobs: lm-eval scores the prompt through these
            prompt_logprobs=self.logprobs if self.echo else None,
            n=self.n,
            best_of=self.best_of,
        )


def _check_stream_options(stream: bool | None, options: StreamOptions | None) -> None:
    if options is not None and not stream:  # as OpenAI: options for a stream that isn't one
        raise ParamError("stream_options", "stream_options is only allowed when stream is true")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in (bias or {}).items():
        try:
            out[int(k)] = float(v)
        except ValueError:
            raise ParamError("logit_bias", f"logit_bias keys must be token ids, got {k!r}") from None
    return out


def _stop_list(stop: StopType) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# ----------------------------------------------------------------------- /v1/chat/completions


class ContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    _check_content = field_validator("content", mode="wrap")(
        _one_of("content must be a string or an array of text parts ({\"type\": \"text\", \"text\": ...})")
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    n: int | None = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: StopType = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --8<-- [start:extras]  (vLLM sampling extensions)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool | None = None
    # --8<-- [end:extras]

    _check_stop = field_validator("stop", mode="wrap")(_one_of("stop must be a string, an array of strings, or null"))

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        _check_stream_options(self.stream, self.stream_options)
        return self

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine parameters; `default_max_tokens` (the rest of the context) applies when neither
        max_completion_tokens nor max_tokens is given. The template's stops are added."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=_logit_bias(self.logit_bias),
            seed=self.seed,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            stop=_stop_list(self.stop) + [s for s in CHAT_STOP if s not in _stop_list(self.stop)],
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            n=self.n or 1,
        )


# NOTE: GPT-2 is a base model with no chat format of its own. This plain transcript is what it has
# seen most of in WebText (forum threads, interviews), so it continues it sensibly:
#
#   System: {system or developer message}
#   User: {user message}
#   Assistant: {assistant message}
#   ...
#   Assistant:
#
# Generation stops at the next turn ("\nUser:", "\nSystem:", "\nAssistant:"), which is never
# returned; the leading space the model writes after "Assistant:" is dropped from the reply.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:", "\nAssistant:"]
# The same template in Jinja (what /tokenizer_info serves as `chat_template`, so that clients that
# render chats themselves, such as lm-eval's remote tokenizer, produce exactly our prompt).
CHAT_TEMPLATE_JINJA = (
    "{% for m in messages %}"
    "{{ {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'}[m['role']] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
CHAT_TEMPLATE_DOC = (
    "Messages are rendered one per line as '<Role>: <content>' with Role System (system and developer "
    "messages), User or Assistant, followed by 'Assistant:'; generation stops at '\\nUser:', '\\nSystem:' "
    "or '\\nAssistant:' (never returned), and the leading space of the reply is dropped."
)


def render_chat(messages: list[ChatMessage]) -> str:
    lines = [f"{CHAT_ROLES[m.role]}: {m.text()}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


# ------------------------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float = Field(default=0.0, description="What this request cost, in US dollars (OpenRouter's field).")


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    text: str
    index: int
    logprobs: CompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # --8<-- [start:extras]
    stop_reason: int | str | None = Field(default=None, description="The stop string or token id that ended the sequence.")
    # --8<-- [end:extras]


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamChoice(OpenAIBaseModel):
    text: str
    index: int
    logprobs: CompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatLogprob] | None = None
    refusal: list[ChatLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        # OpenAI's deltas carry only what changed: {"role": ..., "content": ""}, {"content": "x"}, {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------- models, tokenizer, errors


class ModelPricing(OpenAIBaseModel):
    """OpenRouter's shape: US dollars per token, as decimal strings."""

    prompt: str
    completion: str
    request: str = "0"
    image: str = "0"


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2serve"
    context_length: int
    pricing: ModelPricing
    gpt2serve: dict[str, Any] = Field(
        default_factory=dict,
        description="Extension: parameters, random_weights, dtype, device, vocab_size, n_layer, n_head, n_embd.",
    )


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's /tokenize: either `prompt` or chat `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        default=True, description="Accepted for vLLM compatibility; GPT-2 adds no special tokens either way.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give exactly one of prompt or messages")
        return self


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
