"""KV-cache block manager: owns the free list, every sequence's block table and the prefix cache.

Blocks are reference-counted. Without caching each block has one owner and a freed block goes to
the front of the free list (it is warm in the CPU cache on the next allocation), as before.

With caching (vLLM v1's BlockPool and KVCacheManager; names and hashing in engine/prefix_cache.py):
a full block whose K/V are computed is registered under its chain hash (`cache_computed`), and a
waiting sequence starts from the longest chain of registered blocks that prefixes its tokens
(`lookup`, then `admit`), the blocks shared (refcount + 1), never written again (a sequence only
writes at positions past its computed prefix, which the hit leaves on a block boundary). At least
the last token is always recomputed, so a full hit still yields that token's logits. A block no
sequence holds stays in the cache, evictable: the free list keeps blocks without a hash in front
(reused first) and cached ones behind them, least recently freed first (a sequence's blocks freed
tail first, so its tail goes before its shared head), and the allocator takes from the front,
dropping the hash of a cached block it hands out (an eviction). `num_free` counts evictable
blocks: they are free for every limit (admission, preemption, KV usage metrics).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from engine.prefix_cache import NO_HIT, PrefixCacheStats, PrefixHit, chain_hash, root_hash, token_slice

if TYPE_CHECKING:
    from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_caching
        # Blocks no sequence holds: those without a hash first, then cached ones, least recently freed first.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # chain hash -> the block registered under it
        # Per sequence: the identity its chain is seeded with and the hashes of its full blocks so far,
        # and how many of its leading blocks went through registration (hit blocks count as done).
        self._chains: dict[str, tuple[str, list[bytes]]] = {}
        self._registered: dict[str, int] = {}
        self._queries = 0
        self._hits = 0
        self._evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never allocated, freed, or cached but held by no sequence."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self.table(seq_id)))

    def fits(self, seq_id: str, num_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Whether `seq_id` (starting from `hit` if it holds no blocks yet) can grow to `num_tokens` now.

        A hit block no one holds leaves the free list when it is taken, so it counts against the free blocks.
        """
        need = max(0, self.blocks_for(num_tokens) - len(self.table(seq_id)) - len(hit.blocks))
        revived = sum(1 for block in hit.blocks if self._refs[block] == 0)
        return need + revived <= len(self._free)

    def ensure(self, seq_id: str, num_tokens: int) -> bool:
        """Grow `seq_id`'s table to hold `num_tokens` tokens. False (and no change) if blocks run out."""
        need = self.extra_blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._allocate())
        return True

    def _allocate(self) -> int:
        block, _ = self._free.popitem(last=False)
        stale = self._hash_of[block]
        if stale is not None:  # the least recently freed cached block: its K/V are overwritten from now on
            del self._cached[stale]
            self._hash_of[block] = None
            self._evictions += 1
        self._refs[block] = 1
        return block

    def free(self, seq_id: str) -> None:
        """Drop `seq_id`'s hold on its blocks; cached ones stay reusable until the allocator needs them."""
        for block in reversed(self._tables.pop(seq_id, [])):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:
                    self._free.move_to_end(block, last=False)
        self._chains.pop(seq_id, None)
        self._registered.pop(seq_id, None)

    def slot(self, seq_id: str, position: int) -> int:
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- prefix cache -------------------------------------------------------------------------
    def lookup(self, seq: Sequence, identity: str, *, read: bool = True) -> PrefixHit:
        """The cached blocks `seq` (waiting, holding none) can start from, computed by weights `identity`.

        Changes nothing but `seq`'s hash chain; `admit` takes the hit. With read=False (a request for
        prompt logprobs: they come from computing every prompt position) nothing is looked up, but the
        blocks it computes are still registered for others.
        """
        if not self.caching:
            return NO_HIT
        entry = self._chains.get(seq.request_id)
        if entry is None or entry[0] != identity:
            self._chains[seq.request_id] = (identity, [])
        if not read:
            return PrefixHit(identity)
        limit = (seq.num_tokens - 1) // self.block_size  # the last token is always recomputed
        blocks: list[int] = []
        for block_hash in self._chain(seq, limit):
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(identity, tuple(blocks), len(blocks) * self.block_size)

    def admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """Give `seq` (holding no blocks) the blocks of `hit`, just returned by `lookup` for it."""
        seq_id = seq.request_id
        if self._tables.get(seq_id):
            raise RuntimeError(f"{seq_id} already holds blocks; a prefix hit is only for a sequence holding none")
        if not self.caching:
            return
        hashes = self._chains[seq_id][1] if hit.blocks else []
        table = self._tables.setdefault(seq_id, [])
        for i, block in enumerate(hit.blocks):
            if self._cached.get(hashes[i]) != block:
                raise RuntimeError(f"stale prefix hit for {seq_id}: block {block} was evicted since the lookup")
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            table.append(block)
        self._registered[seq_id] = len(hit.blocks)
        self._queries += seq.num_tokens
        self._hits += hit.num_tokens

    def cache_computed(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks whose K/V are computed (its first `seq.num_computed` tokens)."""
        seq_id = seq.request_id
        if not self.caching or seq_id not in self._chains:
            return
        table = self._tables.get(seq_id, [])
        full = min(seq.num_computed // self.block_size, len(table))
        done = self._registered.get(seq_id, 0)
        if full <= done:
            return
        hashes = self._chain(seq, full)
        for i in range(done, full):
            block, block_hash = table[i], hashes[i]
            # A block another sequence computed with the same content is already registered: keep that one.
            if self._hash_of[block] is None and block_hash not in self._cached:
                self._hash_of[block] = block_hash
                self._cached[block_hash] = block
        self._registered[seq_id] = full

    def _chain(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq`'s chain hashes of its first `num_blocks` full blocks (extended as its tokens grow)."""
        identity, hashes = self._chains[seq.request_id]
        size = self.block_size
        parent = hashes[-1] if hashes else root_hash(identity)
        for i in range(len(hashes), num_blocks):
            parent = chain_hash(parent, token_slice(seq, i * size, (i + 1) * size))
            hashes.append(parent)
        return hashes[:num_blocks]

    def cache_stats(self) -> PrefixCacheStats:
        evictable = sum(1 for block in self._free if self._hash_of[block] is not None)
        return PrefixCacheStats(self.caching, self._queries, self._hits, len(self._cached), evictable, self._evictions)

    # ---- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        held: dict[int, int] = {}
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"{seq_id} holds a block twice"
            for block in table:
                held[block] = held.get(block, 0) + 1
        for block in range(self.num_blocks):
            refs = held.get(block, 0)
            assert self._refs[block] == refs, f"block {block}: refcount {self._refs[block]}, held by {refs} tables"
            assert (block in self._free) == (refs == 0), f"block {block} leaked or was double-freed"
            block_hash = self._hash_of[block]
            assert block_hash is None or self._cached.get(block_hash) == block, f"block {block}: hash not registered"
        assert len(self._cached) == sum(h is not None for h in self._hash_of), "a registered hash has no block"
        cached_flags = [self._hash_of[block] is not None for block in self._free]
        assert cached_flags == sorted(cached_flags), "a cached block is ahead of an uncached one in the free list"
        assert self.caching or not self._cached, "blocks cached with caching off"
