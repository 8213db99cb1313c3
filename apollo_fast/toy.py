"""A tiny random causal LM and a learnable synthetic task, for the demo, tests and benchmarks.

Nothing is downloaded: the model is built from a transformers config with random weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_causal_lm", "PermutationTask"]


def tiny_causal_lm(
    vocab: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, arch: str = "llama"
) -> nn.Module:
    """A random-initialised causal LM: 'llama' (attention only) or 'qwen3_5' (GDN + attention)."""
    torch.manual_seed(seed)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg)
    if arch == "qwen3_5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        cfg = Qwen3_5TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=hidden // heads,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            full_attention_interval=min(4, layers),  # at least one attention layer: 75% GDN from 4 layers up
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        return Qwen3_5ForCausalLM(cfg)
    raise ValueError(f"unknown toy architecture {arch!r}: use 'llama' or 'qwen3_5'")


class PermutationTask:
    """Sequences where each next token is a fixed random permutation of the current one.

    Learnable to near-zero loss: only the first token is random and it is never a target. A
    model that ignores the context sits at ln(vocab).
    """

    def __init__(self, vocab: int = 64, seq_len: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.seq_len = vocab, seq_len
        self.perm = torch.randperm(vocab, generator=gen)
        self._gen = torch.Generator().manual_seed(seed + 1)

    def batch(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch_size, seq_len) int64 token ids."""
        x = torch.empty(batch_size, self.seq_len, dtype=torch.int64)
        x[:, 0] = torch.randint(0, self.vocab, (batch_size,), generator=self._gen)
        for t in range(1, self.seq_len):
            x[:, t] = self.perm[x[:, t - 1]]
        return x.to(device)
