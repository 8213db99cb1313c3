"""Planted effects for the probe tests: tiny models that differ along a known direction, pair sets with and
without a planted linear feature. Everything is built from configs and seeds (nothing downloaded)."""

from __future__ import annotations

import copy

import numpy as np
import torch

HIDDEN = 32


def hybrid_model(seed: int = 0):
    """A tiny Qwen3.5 with layers GDN, attention, GDN (the last layer is GDN) and a shared embedding component.

    Every token embedding gets the same component `common`, so a GDN layer's inputs all have a positive
    projection on it: a value projection planted along `common` then moves every context's state the same way.
    """
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(cfg).eval()
    common = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.5 * common)
    return model, common / common.norm()


def plant_gdn(model, common: torch.Tensor, layer: int = 2, head: int = 1, dim: int = 3, scale: float = 1.0):
    """A copy of `model` whose GDN layer `layer` differs in one row of its value projection (value head `head`,
    channel `dim`), along `common`: a rank-1 change. Returns (trained, the readout direction out_proj[:, h, dim])."""
    trained = copy.deepcopy(model)
    gdn = trained.model.layers[layer].linear_attn
    key_dim = gdn.num_k_heads * gdn.head_k_dim
    row = 2 * key_dim + head * gdn.head_v_dim + dim
    with torch.no_grad():
        gdn.in_proj_qkv.weight[row] += scale * common
    return trained, gdn.out_proj.weight[:, head * gdn.head_v_dim + dim].detach().clone()


def attention_pair(seed: int = 0, layer: int = 1, head: int = 2, dim: int = 5, scale: float = 0.5):
    """A tiny Llama (2 layers, MHA, attention biases) and a copy whose last attention layer's value bias differs in
    one channel: every value vector moves by scale * e_dim, so the readout moves exactly along o_proj[:, h, dim]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_bias=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg).eval()
    trained = copy.deepcopy(base)
    attn = trained.model.layers[layer].self_attn
    with torch.no_grad():
        attn.v_proj.bias[head * attn.head_dim + dim] += scale
    return base, trained, attn.o_proj.weight[:, head * attn.head_dim + dim].detach().clone()


D_TOKENS, U_TOKENS, NEUTRAL = list(range(40, 50)), list(range(50, 60)), list(range(4, 40))


def feature_model(seed: int = 0):
    """A tiny Llama with a planted linear feature u: 'desired' tokens D have +u in their embeddings and output rows,
    'undesired' tokens U have -u. Returns (model, u)."""
    from apollo_fast.toy import tiny_causal_lm

    model = tiny_causal_lm(vocab=64, hidden=HIDDEN, layers=2, heads=4, seed=seed).eval()
    u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed + 5))
    u /= u.norm()
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        e, h = emb.norm(dim=1).mean(), head.norm(dim=1).mean()
        emb[D_TOKENS] += e * u
        emb[U_TOKENS] -= e * u
        head[D_TOKENS] += h * u
        head[U_TOKENS] -= h * u
    return model, u


def feature_pairs(n: int = 40, seed: int = 0) -> dict[str, list[dict]]:
    """Pair sets: 'planted' (desired from D, undesired from U), 'no feature' (both from the neutral tokens) and
    'shuffled' (the planted set with each pair's labels swapped by a fair coin)."""
    rng = np.random.default_rng(seed)

    def prompt():
        return rng.choice(NEUTRAL, size=int(rng.integers(4, 9))).tolist()

    planted = [
        {"prompt": prompt(), "desired": [int(rng.choice(D_TOKENS))], "undesired": [int(rng.choice(U_TOKENS))]}
        for _ in range(n)
    ]
    plain = []
    for _ in range(n):
        a, b = rng.choice(NEUTRAL, 2, replace=False)
        plain.append({"prompt": prompt(), "desired": [int(a)], "undesired": [int(b)]})
    coin = np.random.default_rng(seed + 100).random(n) < 0.5
    shuffled = [
        dict(p, desired=p["undesired"], undesired=p["desired"]) if c else p for p, c in zip(planted, coin, strict=True)
    ]
    return {"planted": planted, "no feature": plain, "shuffled": shuffled}
