"""Prefix caching: what makes two KV blocks interchangeable, and what a lookup found.

A full KV block is named by a hash chain, as in vLLM v1: block i's hash is sha256 over block
i-1's hash and block i's token ids, and the chain starts at a root seeded with the identity of the
weights that computed the K/V. K/V depend on every layer below, so any LoRA delta (on any module,
not only k/v projections) changes them: a block is shared only between sequences of the same
identity. An adapter's identity is its id and a sha256 of its weights (engine/adapters.py:
`LoraAdapter.weights_digest`), taken from the device slot that computed the blocks, so an adapter
reloaded under the same id with other weights (or another adapter given the same id) never finds
the old blocks; the base model is an identity of its own. sha256, not Python's hash(): a
collision would hand one request another's KV (vLLM moved to sha256 for this reason).
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import Sequence

BASE_IDENTITY = "base"  # the base model, no adapter: one engine serves one base
_ROOT_TAG = b"loraserve-prefix-v1\0"


def identity_of(adapter_id: str | None, weights_digest: str | None) -> str:
    """The cache identity of a sequence's weights: the base model's, or the adapter's id and digest."""
    if adapter_id is None:
        return BASE_IDENTITY
    return f"adapter\0{adapter_id}\0{weights_digest}"


def root_hash(identity: str) -> bytes:
    return hashlib.sha256(_ROOT_TAG + identity.encode("utf-8", "surrogatepass")).digest()


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block holding `token_ids`, after the block hashed `parent`."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """Token ids at positions [start, end) of `seq` (prompt, then output)."""
    prompt = len(seq.prompt_ids)
    if end <= prompt:
        return seq.prompt_ids[start:end]
    if start >= prompt:
        return seq.output_ids[start - prompt : end - prompt]
    return seq.prompt_ids[start:] + seq.output_ids[: end - prompt]


@dataclass(frozen=True)
class PrefixHit:
    """Cached full blocks a waiting sequence can start from: the first `num_tokens` of its tokens."""

    identity: str
    blocks: tuple[int, ...] = ()
    num_tokens: int = 0


NO_HIT = PrefixHit(identity="")


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters as vLLM's: tokens looked up at admission (queries) and found cached (hits)."""

    enabled: bool
    queries: int  # prompt (and recomputed) tokens of admitted sequences that were looked up
    hits: int  # of those, tokens whose K/V came from the cache
    cached_blocks: int  # blocks holding a hash now (in use or evictable)
    evictable_blocks: int  # cached blocks no sequence holds: reusable until the allocator needs them
    evictions: int  # cached blocks handed to a new owner (their hash dropped)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "enabled": self.enabled, "queries": self.queries, "hits": self.hits, "hit_rate": self.hit_rate,
            "cached_blocks": self.cached_blocks, "evictable_blocks": self.evictable_blocks,
            "evictions": self.evictions,
        }
