"""Text encoders with a caption cache, and the embedded default: a small deterministic
stand-in for SD3's CLIP/T5 stack.

Real SD3 text encoding (`dwm.models.sd3_text`) is gigabytes of weights and tens of
milliseconds per prompt; the embedded default needs neither downloads nor a GPU, only
embeddings that are stable (the same caption gives the same tensors in every process and on
every run), that differ between captions, and that have the shapes the denoiser's text path
expects.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dwm.models.base import TextEmbedding, TextEncoder

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class CacheStats:
    """Counters of a caption cache: lookups answered from it, encodings done, fill, capacity."""

    hits: int
    misses: int
    size: int
    capacity: int


class CachedTextEncoder(TextEncoder):
    """A text encoder with an LRU cache of `cache_size` captions (0: no cache).

    The captions of a drive repeat, so most frames cost a lookup. Subclasses implement
    `_encode_batch` for the captions not in the cache (each distinct one encoded once).
    """

    def __init__(self, cache_size: int = 256):
        if cache_size < 0:
            raise ValueError(
                f"cache_size={cache_size}: must be 0 (no cache) or a positive number of captions"
            )
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._capacity = cache_size
        self._hits = self._misses = 0

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """M distinct captions -> tokens (M, L, D), pooled (M, D_pooled)."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """P captions -> tokens (P, L, D), pooled (P, D_pooled)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r}")
        if not prompts:
            raise ValueError("prompts is empty: encode needs at least one caption")
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        self._hits += len(prompts) - len(missing)
        self._misses += len(missing)
        if missing:
            tokens, pooled = self._encode_batch(missing)
            for i, prompt in enumerate(missing):
                found[prompt] = (tokens[i], pooled[i])
                if self._capacity:
                    self._cache[prompt] = found[prompt]
                    if len(self._cache) > self._capacity:
                        self._cache.popitem(last=False)
        # torch.stack copies, so callers never alias (or mutate) the cached tensors.
        return TextEmbedding(
            tokens=torch.stack([found[p][0] for p in prompts]),
            pooled=torch.stack([found[p][1] for p in prompts]),
        )

    def cache_stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, size=len(self._cache), capacity=self._capacity)


class HashTextEncoder(CachedTextEncoder):
    """Words -> rows of a seeded random table, chosen by a stable hash of the word.

    tokens (P, max_length, token_dim): word embedding plus a position embedding, the caption's
    words first, then padding rows (a fixed pad embedding plus position), truncated at
    max_length words. pooled (P, pooled_dim): the mean of the word embeddings (the pad
    embedding for an empty caption) through a seeded random projection.

    Encodings are cached by caption text in an LRU cache of `cache_size` captions, so the
    captions of a drive, which repeat, cost a lookup; `cache_stats()` reads its counters.
    """

    def __init__(
        self,
        seed: int = 0,
        max_length: int = 16,
        token_dim: int = 64,
        pooled_dim: int = 32,
        vocab_size: int = 4096,
        cache_size: int = 256,
    ):
        sizes = {
            "max_length": max_length,
            "token_dim": token_dim,
            "pooled_dim": pooled_dim,
            "vocab_size": vocab_size,
        }
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"{key}={value}: must be a positive integer")
        super().__init__(cache_size)
        self.max_length = max_length
        self.token_dim = token_dim
        self.pooled_dim = pooled_dim
        generator = torch.Generator().manual_seed(seed)
        # Row vocab_size is the pad embedding; words hash into rows [0, vocab_size).
        self._words = torch.randn(vocab_size + 1, token_dim, generator=generator)
        self._positions = 0.1 * torch.randn(max_length, token_dim, generator=generator)
        self._pool = torch.randn(token_dim, pooled_dim, generator=generator) / token_dim**0.5

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (M, max_length, token_dim), pooled (M, pooled_dim), float32."""
        encoded = [self._encode_one(p) for p in prompts]
        return torch.stack([t for t, _ in encoded]), torch.stack([p for _, p in encoded])

    def _word_row(self, word: str) -> int:
        # hashlib, not hash(): Python salts str hashes per process.
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % (self._words.shape[0] - 1)

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption -> tokens (max_length, token_dim), pooled (pooled_dim,)."""
        pad = self._words.shape[0] - 1
        rows = [self._word_row(word) for word in _WORD.findall(prompt.lower())][: self.max_length]
        words = self._words[rows] if rows else self._words[[pad]]
        index = torch.tensor(rows + [pad] * (self.max_length - len(rows)))
        tokens = self._words[index] + self._positions
        return tokens, words.mean(dim=0) @ self._pool
