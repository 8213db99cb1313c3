"""Memory of fine-tuning Qwen3.5-27B in bf16 with APOLLO, with and without step in backward: the README's table.

The shapes are read off transformers' Qwen3_5ForCausalLM built on the meta device (no memory, no download)
from the 27B's config values; which parameters get APOLLO and how the units of step in backward fall come
from the package's own functions (apollo_param_groups, model_units, effective_rank). The formulas for the
optimizer state, the Triton scratch and the frozen context are checked against real objects on a tiny model
by tests/test_memory_table.py. Activations of the segment are not included (they depend on the segment
length and batch, and are the same with and without step in backward).

    python benches/memory_table.py            # prints the markdown tables; writes memory_table.{json,md} to $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from apollo_fast import apollo_param_groups
from apollo_fast.optim.in_backward import model_units
from apollo_fast.reference.projection import effective_rank

GIB = 2**30

# Qwen3.5-27B (text model). The 27B values (hidden, layers, MLP, heads) are those of the model's config.json
# (text_config); the others are transformers' Qwen3_5TextConfig defaults, which the 27B keeps: vocab 248320,
# head_dim 256, 4 KV heads, GDN 16 key heads, key/value head dims 128, conv kernel 4, full attention every
# 4th layer (48 GDN + 16 attention layers), untied embeddings.
QWEN35_27B = dict(
    hidden_size=5120,
    intermediate_size=17408,
    num_hidden_layers=64,
    num_attention_heads=24,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=48,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    vocab_size=248320,
    tie_word_embeddings=False,
)


def qwen35_on_meta(**config) -> nn.Module:
    """transformers' Qwen3_5ForCausalLM with `config` on the meta device (shapes only)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    with torch.device("meta"):
        return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**config))


def apollo_state_bytes(groups: list[dict], rank: int, moment_bytes: int = 4, projection: str = "philox") -> int:
    """Device bytes of APOLLO's state for the APOLLO matrices of `groups`: two C x r moments and the limiter."""
    total = 0
    for g in groups:
        if g.get("apollo", True):
            for _, p in g["params"]:
                if p.dim() == 2:
                    total += 2 * max(p.shape) * effective_rank(rank, p.shape, projection) * moment_bytes + 4
    return total


def adamw_state_bytes(groups: list[dict]) -> int:
    """Device bytes of the AdamW state (two fp32 moments) of every parameter APOLLO does not take."""
    return sum(
        2 * 4 * p.numel() for g in groups for _, p in g["params"] if not (g.get("apollo", True) and p.dim() == 2)
    )


def triton_scratch_bytes(groups: list[dict], rank: int) -> int:
    """The Triton backend's scratch (fused.FusedLaunches): P~ (4 r d, kept between refreshes), R (4 C r) and three
    fp32 channel vectors (12 C) per APOLLO matrix."""
    total = 0
    for g in groups:
        if g.get("apollo", True):
            for _, p in g["params"]:
                if p.dim() == 2:
                    c, d, r = max(p.shape), min(p.shape), effective_rank(rank, p.shape, "philox")
                    total += 4 * r * d + 4 * c * r + 12 * c
    return total


def context_bytes(config, tokens: int, dtype_bytes: int = 2) -> dict[str, int]:
    """A FrozenContext of `tokens` tokens (batch 1): keys and values [Hkv, L, D] per attention layer (model dtype);
    per GDN layer the conv prefix [K-1, conv_dim] (model dtype) and the recurrent state [Hv, dk, dv] (fp32)."""
    kinds = config.layer_types
    n_attn, n_gdn = kinds.count("full_attention"), kinds.count("linear_attention")
    kv = n_attn * 2 * config.num_key_value_heads * tokens * config.head_dim * dtype_bytes
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim
    conv_dim += config.linear_num_value_heads * config.linear_value_head_dim
    conv = n_gdn * (config.linear_conv_kernel_dim - 1) * conv_dim * dtype_bytes
    state = n_gdn * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return {"kv": kv, "gdn": conv + state}


def memory_items(
    model: nn.Module, ranks=(256, 128), contexts=(8192, 32768), weight_bytes: int = 2, frozen: tuple[str, ...] = ()
) -> dict:
    """Every row of the table, in bytes, for the default param groups (apollo_param_groups(model)); parameters
    whose names contain one of `frozen` are frozen (weights only)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
    groups = apollo_param_groups(model)
    params = [p for g in groups for _, p in g["params"]]
    names = {p: n for n, p in model.named_parameters()}
    n = sum(p.numel() for p in params)  # trained
    units = model_units(model, params, "layer")
    unit_bytes = {name: sum(p.numel() for p in ps) * weight_bytes for name, ps in units}
    largest = max(unit_bytes, key=unit_bytes.get)
    largest_layer = max((u for u in unit_bytes if ".layers." in f".{u}"), key=unit_bytes.get)
    apollo_n = sum(p.numel() for g in groups if g.get("apollo", True) for _, p in g["params"] if p.dim() == 2)
    adamw_names = [names[p] for g in groups if g.get("apollo") is False for _, p in g["params"] if p.numel() > 10**8]
    items = {
        "params": sum(p.numel() for p in model.parameters()),
        "trained": n,
        "apollo_params": apollo_n,
        "weights": sum(p.numel() for p in model.parameters()) * weight_bytes,
        "grads_all": n * weight_bytes,
        "grads_largest_unit": unit_bytes[largest],
        "largest_unit": largest,
        "grads_largest_layer": unit_bytes[largest_layer],
        "largest_layer": largest_layer,
        "adamw_state": adamw_state_bytes(groups),
        "adamw_large": adamw_names,
        "compensation": n * 2,
    }
    for r in ranks:
        items[f"apollo_r{r}"] = apollo_state_bytes(groups, r)
        items[f"apollo_r{r}_bf16"] = apollo_state_bytes(groups, r, moment_bytes=2)
        items[f"scratch_r{r}"] = triton_scratch_bytes(groups, r)
    for t in contexts:
        c = context_bytes(model.config, t, weight_bytes)
        items[f"context_{t}"] = c["kv"] + c["gdn"]
        items[f"context_{t}_kv"], items[f"context_{t}_gdn"] = c["kv"], c["gdn"]
    return items


def gib(x: int) -> str:
    return f"{x / GIB:.2f}"


def tables(it: dict, frozen: dict, ranks=(256, 128), contexts=(8192, 32768)) -> str:
    """The README's two markdown tables: the components (default groups), then the totals per setting
    (`frozen`: the items with the embeddings and the head frozen)."""
    k = lambda t: f"{t // 1024}k"  # noqa: E731
    rows = [
        ("bf16 weights", f"{it['params'] / 1e9:.2f} B parameters x 2 B", it["weights"]),
        ("bf16 gradients, normal step", "all of them", it["grads_all"]),
        ("bf16 gradients, step in backward", f"the largest unit alive: {it['largest_unit']}", it["grads_largest_unit"]),
        ("", f"(the largest decoder layer: {it['largest_layer']})", it["grads_largest_layer"]),
    ]
    for r in ranks:
        rows.append((f"APOLLO state, rank {r}", "two C x r fp32 moments per matrix", it[f"apollo_r{r}"]))
        rows.append(("", "the same with state_dtype=torch.bfloat16", it[f"apollo_r{r}_bf16"]))
    rows.append(
        ("AdamW state of the rest", f"fp32 moments; {', '.join(it['adamw_large'])} are most of it", it["adamw_state"])
    )
    for r in ranks:
        rows.append((f"Triton scratch, rank {r}", "P~ (kept), R, channel vectors", it[f"scratch_r{r}"]))
    rows.append(("compensation buffer", "bf16, 2 B per parameter (param_rounding='compensated')", it["compensation"]))
    for t in contexts:
        rows.append((f"frozen context, {k(t)} tokens", "K, V of 16 attention layers (bf16)", it[f"context_{t}_kv"]))
        rows.append(("", "conv prefix (bf16) + fp32 state of 48 GDN layers", it[f"context_{t}_gdn"]))
    out = ["| component | what | GiB |", "| --- | --- | ---: |"]
    out += [f"| {a} | {b} | {gib(c)} |" for a, b, c in rows]

    out += [
        "",
        "| total before activations (GiB) | " + " | ".join(f"rank {r}, {k(t)}" for r in ranks for t in contexts) + " |",
    ]
    out.append("| --- |" + " ---: |" * (len(ranks) * len(contexts)))
    for label, x, grads, comp in (
        ("normal step", it, "grads_all", False),
        ("step in backward", it, "grads_largest_unit", False),
        ("step in backward, embeddings and head frozen", frozen, "grads_largest_unit", False),
        ("step in backward + compensation buffer", it, "grads_largest_unit", True),
    ):
        cells = []
        for r in ranks:
            for t in contexts:
                fixed = x["weights"] + x[f"apollo_r{r}"] + x["adamw_state"] + x[f"scratch_r{r}"]
                cells.append(gib(fixed + x[grads] + x["compensation"] * comp + x[f"context_{t}"]))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for memory_table.{json,md}")
    args = ap.parse_args()
    items = memory_items(qwen35_on_meta(**QWEN35_27B))
    frozen = memory_items(qwen35_on_meta(**QWEN35_27B), frozen=("embed_tokens", "lm_head"))
    md = tables(items, frozen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_table.json").write_text(
        json.dumps({"config": QWEN35_27B, "bytes": items, "frozen_embeddings_bytes": frozen}, indent=2) + "\n"
    )
    (out / "memory_table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
