"""A server stand-in for the SIGKILL test: concurrent requests reserve, 'generate', settle, forever.

    python crash_worker.py DATABASE_URL KEY_ID INSTANCE
prints "R <id> <worst>" after each reservation and "S <id> <cost>" after each settle, until killed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid

from gpt2serve.accounts.billing import Billing
from gpt2serve.accounts.pricing import Pricing
from gpt2serve.accounts.store import AccountStore, KeyRecord


async def client(billing: Billing, key, n: int) -> None:
    rng = random.Random(n)
    while True:
        gid = f"gen-{n}-{uuid.uuid4().hex[:8]}"
        res = await billing.reserve(key, prompt_tokens=10, max_completion_tokens=50, model="gpt2", generation_id=gid)
        print("R", gid, res.amount_micros, flush=True)
        await asyncio.sleep(rng.uniform(0, 0.02))  # generating
        done = rng.randint(0, 50)
        cost = await billing.settle(res, prompt_tokens=10, completion_tokens=done, finish_reason="length",
                                    streamed=True, cancelled=False, failed=False, latency_s=0.01)
        print("S", gid, cost, flush=True)


async def main(url: str, key_id: int, instance: str) -> None:
    store = AccountStore(url, instance=instance)
    info = store.get_key(key_id)
    # What the auth dependency would hand over (the worker never sees a plaintext key).
    key = KeyRecord(info.key_id, info.account_id, info.prefix, info.label, info.limit_micros, info.usage_micros,
                    reserved_micros=0, revoked=False, account_available_micros=0)
    billing = Billing(store, Pricing(1, 2), rpm=0, tpm=0)
    await asyncio.gather(*(client(billing, key, n) for n in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
