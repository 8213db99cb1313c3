"""A behaviour a tiny model learns in a few dozen steps, in token ids: the probes' planted effect.

After a marker token and a key token the model should answer the key's mapped token f(key). A
training example is a random context followed by one segment [marker, key, f(key)] (loss on f(key)
only); a held-out pair is a fresh random context + [marker, key] with desired f(key) and undesired
g(key) = f(sigma(key)), sigma a cyclic shift of the keys, so desired and undesired come from the same
token set and a model that learned nothing key-specific has no preference. More examples cover more
keys, so the effect grows with n. Used by the tests and the README's CPU report.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MappingTask"]


class MappingTask:
    """Keys are token ids [first_key, first_key + n_keys); contexts draw from [first_key, vocab)."""

    def __init__(self, vocab: int = 64, n_keys: int = 24, first_key: int = 8, marker: int = 1, seed: int = 0):
        if first_key + n_keys > vocab or marker >= first_key:
            raise ValueError("keys must fit in the vocabulary above the marker")
        rng = np.random.default_rng(seed)
        self.vocab, self.marker = vocab, marker
        self.keys = np.arange(first_key, first_key + n_keys)
        self.f = dict(zip(self.keys.tolist(), rng.permutation(self.keys).tolist(), strict=True))
        cycle = rng.permutation(self.keys).tolist()
        sigma = {cycle[i]: cycle[(i + 1) % len(cycle)] for i in range(len(cycle))}
        self.g = {k: self.f[sigma[k]] for k in self.keys.tolist()}
        self.first = first_key

    def _context(self, rng: np.random.Generator) -> list[int]:
        return rng.integers(self.first, self.vocab, size=int(rng.integers(8, 17))).tolist()

    def examples(self, n: int, seed: int = 1) -> list:
        """n training examples (apollo_fast.training.data.BehaviourExample)."""
        from ..training.data import BehaviourExample, Segment

        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            key = int(rng.choice(self.keys))
            ids = torch.tensor([self.marker, key, self.f[key]])
            labels = torch.tensor([-100, -100, self.f[key]])
            out.append(BehaviourExample(i + 1, torch.tensor(self._context(rng)), (Segment(ids, labels, 1),)))
        return out

    def pairs(self, n: int, seed: int = 2) -> list[dict]:
        """n held-out pairs {"prompt", "desired", "undesired"} as token-id lists."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            key = int(rng.choice(self.keys))
            out.append(
                {
                    "prompt": self._context(rng) + [self.marker, key],
                    "desired": [self.f[key]],
                    "undesired": [self.g[key]],
                }
            )
        return out

    def texts(self, n: int, seed: int = 3, length: int = 24) -> list:
        """n general-data items (GeneralItem): random context tokens, for perplexity."""
        from ..training.data import GeneralItem

        rng = np.random.default_rng(seed)
        return [
            GeneralItem(i + 1, torch.tensor(rng.integers(self.first, self.vocab, size=length).tolist()))
            for i in range(n)
        ]
