"""KV-cache block accounting (no tensors): which cache blocks each sequence owns.

NOTE(engine): blocks are reserved for a request's worst case (prompt + max_tokens) when it is
admitted, the way llama.cpp's server reserves a slot: a running sequence can never run out of cache,
so there is no preemption or recomputation, and the configured memory budget is a hard bound.
The price is that short answers to long max_tokens hold cache they never use until they finish.
Full prompt blocks are shared (reference-counted) between the n / best_of sequences of a request.
"""

from __future__ import annotations


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        # A stack: the most recently freed block is handed out first, so the pages that are reused
        # stay warm (PERF-NOTES: idle memory is handed back to the host and is slow to touch again).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> list[int]:
        for b in blocks:
            self._refs[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
            elif self._refs[b] < 0:  # a bug, never input: say so loudly
                raise RuntimeError(f"block {b} freed twice")
