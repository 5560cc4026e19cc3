"""Server settings: one pydantic-settings class, from CLI flags and GPT2SERVE_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPT2SERVE_", extra="ignore")

    # model and engine
    model: str = "random:gpt2"  # local folder, Hub id, or random:<id>
    served_model_name: str | None = None  # id shown in /v1/models; default: the model's own id
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 | int8
    device: str = "auto"  # auto | cpu | cuda
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    prefill_first_tokens: int = Field(256, ge=0)  # new prompts up to this many tokens get a step of their own
    max_queue: int = 256  # waiting requests before 429 overloaded
    kv_cache_memory: str = "auto"  # bytes (e.g. "2GiB") or auto
    kv_cache_dtype: Literal["auto", "int8"] = "auto"  # int8: per-head int8 K/V + fp32 scales (~half the bytes)
    threads: int | None = None  # torch intra-op threads; default: the machine's cores
    kernels: Literal["auto", "torch"] = "auto"  # auto: oneDNN packed bf16 / AMX int8 where the CPU has them

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 2 * 1024 * 1024  # 413 above this
    keepalive_seconds: float = 15.0  # SSE comment lines while a stream waits
    public_metrics: bool = True

    # accounts and billing
    auth: bool = True  # --no-auth serves without keys (local use)
    database_url: str = "sqlite:///gpt2serve.db"
    # which replica holds a reservation: at start-up a server releases only its own open holds, so
    # replicas sharing one PostgreSQL ledger need distinct, stable names (default: the host name)
    instance_name: str | None = None
    signup_enabled: bool = True
    starter_credit_micros: int = 1_000_000  # micro-USD given at sign-up ($1.00)
    # The ledger counts integer micro-USD; prices are whole micro-USD per token, so no cost is ever
    # fractional ($1 / 1M prompt tokens, $2 / 1M completion tokens by default).
    price_prompt_micros: int = 1
    price_completion_micros: int = 2
    rate_limit_rpm: int = 600
    rate_limit_tpm: int = 1_000_000
    signup_rate_per_hour: int = 5  # sign-ups per client address per hour

    # evaluation report shown on the model page (written by `gpt2serve eval --output`)
    eval_report: str | None = None
