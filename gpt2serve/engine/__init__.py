"""The inference engine: continuous batching over a paged KV cache (see core.py)."""

from gpt2serve.engine.core import LLM, AsyncEngine, ContextLengthExceeded, Engine, EngineConfig, EngineOverloaded
from gpt2serve.engine.outputs import RequestOutput, SequenceOutput, TokenLogprob
from gpt2serve.engine.sampling import ParamError, SamplingParams

__all__ = [
    "LLM", "AsyncEngine", "Engine", "EngineConfig", "EngineOverloaded", "ContextLengthExceeded",
    "RequestOutput", "SequenceOutput", "TokenLogprob", "ParamError", "SamplingParams",
]
