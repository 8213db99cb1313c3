"""Tiny random causal LMs for the frozen-context tests, built from configs (nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 97
# GDN and attention interleaved so a GDN layer follows an attention layer and vice versa.
HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def _common(**extra) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **extra,
    )


def _hybrid(**extra) -> dict:
    return _common(
        head_dim=16,
        layer_types=HYBRID_LAYERS,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        **extra,
    )


def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """'qwen3_5' | 'qwen3_next' (dense) | 'qwen3_next_moe' | 'llama' | 'qwen3': a tiny random model in eval mode."""
    torch.manual_seed(seed)
    if arch == "qwen3_5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_hybrid()))
    elif arch in ("qwen3_next", "qwen3_next_moe"):
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        moe = dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
        model = Qwen3NextForCausalLM(
            Qwen3NextConfig(**_hybrid(**(moe if arch.endswith("moe") else {"num_experts": 0})))
        )
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**_common()))
    elif arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**_common(head_dim=8)))
    else:
        raise ValueError(arch)
    _randomise_norms(model)
    return model.to(dtype).eval()


def _randomise_norms(model: nn.Module) -> None:
    """Norm weights start at 0 or 1; make them random so their gradients are not special cases."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
