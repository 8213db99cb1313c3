"""`probe gdn-state`: how training changed what each layer keeps from a context, and what it reads out of it.

For each held-out context c_1..c_L, both models encode c_1..c_{L-1} (`encode_context`); c_L is the
next token. Per layer:

- state: GDN layers keep the recurrent state S [Hv, dk, dv] (fp32), attention layers the context's
  keys and values. rel_change = ||S_after - S_before|| / ||S_before|| (Frobenius; keys and values
  together for attention) and cosine = <S_after, S_before> / (||S_after|| ||S_before||), per layer and
  per head (value head for GDN, key/value head for attention), averaged over contexts.
- readout: r(S) is the layer's token-mixer output for the next token c_L (the vector the GDN block's
  out_proj or the attention block's o_proj adds to the residual stream) computed by the TRAINED model
  with the context state S at that layer (every other layer keeps the trained model's own state). The
  readout change dr = r(S_after) - r(S_before) is therefore the change attributable to the state
  alone: the same weights and the same input, only the layer's state differs.
  readout_change = mean ||dr|| / mean ||r(S_before)|| over contexts.
- alignment (given a steering vector for the behaviour): the cosine between the mean readout change
  over contexts and the steering direction at that layer (both live in the residual stream);
  positive = the state now pushes the next token's residual stream along the behaviour.
  baseline: the `level` quantile of |cosine| between a fixed vector and uniformly random directions
  in the same dimension (about 1.96 / sqrt(hidden) at 95%), so |alignment| above it is more than a
  random direction reaches. axis_share: the share of the readout change's energy along the direction,
  sum (dr . v)^2 / sum ||dr||^2 (sign-agnostic; a random direction gets 1 / hidden on average).

A change in one layer also changes the input of every later layer, so later layers' states move with
it; input_change (the relative change of the layer's input, at up to 64 evenly spaced context positions)
tells such propagated change apart from a change of the layer's own weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import DEFAULT_STATS, StatOptions, ci_note
from .inputs import ProbeError, check_same_architecture, load_contexts, open_model
from .report import Report, fmt, fmt_ci, new_figure, png_bytes, table
from .scoring import eval_mode
from .stats import Interval, bootstrap, interval
from .transfer import free_memory

__all__ = ["gdn_state", "random_direction_baseline"]


def random_direction_baseline(dim: int, level: float, n: int = 20000, seed: int = 0) -> float:
    """The `level` quantile of |cos(u, e)| for u uniform on the sphere in `dim` dimensions (any fixed e)."""
    g = np.random.default_rng(seed)
    z = g.standard_normal((n, dim))
    return float(np.quantile(np.abs(z[:, 0]) / np.linalg.norm(z, axis=1), level))


def _mixer_output_module(layer: nn.Module, kind: str) -> nn.Module:
    """The projection whose output the layer's token mixer adds to the residual stream."""
    mod = (
        getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if kind == "attention"
        else getattr(getattr(layer, "linear_attn", None), "out_proj", None)
    )
    if mod is None:
        raise ProbeError(f"cannot find the {kind} output projection of layer {type(layer).__name__}")
    return mod


INPUT_POSITIONS = 64  # context positions at which a layer's input is compared (bounded memory)


def _sample_positions(length: int) -> torch.Tensor:
    """Up to INPUT_POSITIONS evenly spaced positions of a context, always including its last one."""
    return torch.unique(torch.linspace(0, length - 1, min(length, INPUT_POSITIONS)).round().long())


class _Readout:
    """Forward hooks on every layer's mixer output projection (its output at the last position) and input norm
    (its input at `positions`, fp32 on the CPU, when positions are set), kept only until the next forward."""

    def __init__(self, model: nn.Module, kinds: Sequence[str]) -> None:
        from ..steering import decoder_layers

        self.layers = decoder_layers(model)
        self.kinds = kinds
        self.out: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self.handles: list[Any] = []

    def _input(self, i: int, x: torch.Tensor) -> None:
        if self.positions is not None:
            self.inputs[i] = x[0, self.positions.to(x.device)].float().cpu()

    def __enter__(self) -> _Readout:
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds, strict=True)):
            mod = _mixer_output_module(layer, kind)
            self.handles.append(mod.register_forward_hook(lambda m, a, o, i=i: self.out.__setitem__(i, o[0, -1])))
            self.handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: self._input(i, a[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _with_state(ctx: Any, layer: int, state: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """A copy of a FrozenContext whose `layer` holds `state` (read-only like the rest)."""
    states = list(ctx.states)
    states[layer] = state
    states = tuple(states)
    return dataclasses.replace(ctx, states=states, _versions=tuple(t._version for p in states for t in p))


def _state_metrics(kind: str, before, after) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per head: ||after - before||^2, ||before||^2, ||after||^2, <after, before> (fp64 numpy)."""
    if kind == "gdn":
        b, a = before[1].double()[0], after[1].double()[0]  # [Hv, dk, dv]
        dims = (1, 2)
    else:
        b = torch.cat([before[0], before[1]], dim=-1).double()[0]  # [Hkv, Lc, 2D]
        a = torch.cat([after[0], after[1]], dim=-1).double()[0]
        dims = (1, 2)
    return tuple(
        x.cpu().numpy()
        for x in ((a - b).square().sum(dims), b.square().sum(dims), a.square().sum(dims), (a * b).sum(dims))
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def _cos(dot: np.ndarray, na2: np.ndarray, nb2: np.ndarray) -> np.ndarray:
    den = np.sqrt(na2 * nb2)
    return np.where(den > 0, dot / np.where(den > 0, den, 1.0), np.where((na2 == 0) & (nb2 == 0), 1.0, 0.0))


def gdn_state(
    base: str | os.PathLike | nn.Module,
    trained: str | os.PathLike | nn.Module,
    contexts: str | os.PathLike | Sequence[Any],
    *,
    vector: Any = None,
    stats: StatOptions = DEFAULT_STATS,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> Report:
    """Per layer (and head): state change, readout change and its alignment with a steering vector (module doc).

    vector: a SteeringVector or its .safetensors path (optional).
    """
    from ..steering import SteeringVector

    stats.check()
    base_h = open_model(base, tokenizer, device=device, dtype=dtype, what="base model")
    trained_h = open_model(trained, base_h.tokenizer, device=device, dtype=dtype, what="trained model")
    check_same_architecture(base_h, trained_h)
    if isinstance(vector, (str, os.PathLike)):
        try:
            vector = SteeringVector.load(vector)
        except Exception as err:  # safetensors raises its own error types for junk files
            raise ProbeError(f"vector {vector}: not an apollo_fast steering vector ({err})") from None
    if vector is not None:
        text = base_h.config.get_text_config()
        if (vector.hidden_size, vector.num_layers) != (text.hidden_size, text.num_hidden_layers):
            raise ProbeError(
                f"steering vector is for hidden size {vector.hidden_size} and {vector.num_layers} "
                f"layers; the models have {text.hidden_size} and {text.num_hidden_layers}"
            )
    ids = load_contexts(contexts, base_h)
    kinds, arch, saved, inputs_before = _base_states(base_h.load(), ids, progress)
    base_h.release()  # a model read from a folder is dropped before the trained one is read
    free_memory()
    model = trained_h.load()
    if vector is not None:
        vector.check_compatible(model)
    heads, dr, r_norm, input_change = _measure(model, ids, kinds, arch, saved, inputs_before, progress)
    n_layers, n_ctx = len(kinds), len(ids)
    hidden = int(dr[0][0].numel())
    baseline = random_direction_baseline(hidden, stats.level, seed=stats.boot_seed)
    layers = [
        _layer_result(
            i,
            kinds[i],
            heads[i],
            torch.stack(dr[i]).double().numpy(),
            np.array(r_norm[i]),
            np.array(input_change[i]),
            vector,
            baseline,
            stats,
        )
        for i in range(n_layers)
    ]
    data = {
        "base": base_h.name,
        "trained": trained_h.name,
        "arch": arch,
        "n_contexts": n_ctx,
        "context_tokens": [len(c) - 1 for c in ids],
        "vector": None if vector is None else {"layers": vector.layers, "method": vector.method},
        "hidden_size": hidden,
        "baseline": baseline,
        "settings": {"level": stats.level, "n_boot": stats.n_boot, "boot_seed": stats.boot_seed},
        "layers": layers,
    }
    return Report("gdn-state", data, _markdown(data, stats), {"gdn_state.png": _plot(data, stats)})


@torch.no_grad()
def _base_states(model: nn.Module, ids: list[list[int]], progress: bool):
    """Encode every context with the base model: layer kinds, arch, per context the states (CPU) and the layers'
    inputs at the sampled positions."""
    from tqdm.auto import tqdm

    from .. import encode_context

    saved, inputs = [], []
    with eval_mode(model):
        dev = next(model.parameters()).device
        kinds = encode_context(model, torch.tensor([ids[0][:1]], device=dev)).layer_kinds
        with _Readout(model, kinds) as rec:
            for c in tqdm(ids, desc="encode (base)", unit="context", leave=False, disable=not progress):
                rec.positions = _sample_positions(len(c) - 1)
                ctx = encode_context(model, torch.tensor([c[:-1]], device=dev))
                saved.append(tuple(tuple(t.cpu() for t in s) for s in ctx.states))
                inputs.append(dict(rec.inputs))
    return kinds, ctx.arch, saved, inputs


@torch.no_grad()
def _measure(model: nn.Module, ids, kinds, arch: str, saved, inputs_before, progress: bool):
    """With the trained model, per context and layer: state statistics against the base's state, the readout
    change dr = r(S_after) - r(S_before) (only that layer's state swapped), |r(S_before)|, the input change."""
    from tqdm.auto import tqdm

    from .. import encode_context
    from ..frozen import segment_logits

    n_layers = len(kinds)
    heads: dict[int, list[tuple]] = {i: [] for i in range(n_layers)}
    dr: dict[int, list[torch.Tensor]] = {i: [] for i in range(n_layers)}
    r_norm: dict[int, list[float]] = {i: [] for i in range(n_layers)}
    input_change: dict[int, list[float]] = {i: [] for i in range(n_layers)}
    dev = next(model.parameters()).device
    with eval_mode(model), _Readout(model, kinds) as rec:
        for k, c in enumerate(tqdm(ids, desc="states and readouts", unit="context", disable=not progress)):
            rec.positions = _sample_positions(len(c) - 1)
            ctx = encode_context(model, torch.tensor([c[:-1]], device=dev))
            rec.positions = None
            if ctx.arch != arch or ctx.layer_kinds != kinds:
                raise ProbeError(f"base ({arch}) and trained ({ctx.arch}) models have different layers")
            for i in range(n_layers):
                x_b, x_a = inputs_before[k][i], rec.inputs[i]
                input_change[i].append(float((x_a - x_b).norm() / x_b.norm().clamp_min(1e-30)))
            nxt = torch.tensor([c[-1:]], device=dev)
            segment_logits(model, ctx, nxt)
            r_after = {i: rec.out[i].float().cpu() for i in range(n_layers)}
            for i in range(n_layers):
                old = tuple(t.to(dev) for t in saved[k][i])
                heads[i].append(_state_metrics(kinds[i], old, ctx.states[i]))
                segment_logits(model, _with_state(ctx, i, old), nxt)
                r_before = rec.out[i].float().cpu()
                dr[i].append(r_after[i] - r_before)
                r_norm[i].append(float(r_before.norm()))
    return heads, dr, r_norm, input_change


def _mean_ci(values: np.ndarray, stats: StatOptions) -> Interval:
    return bootstrap(values, lambda v: v.mean(-1), **stats.kw)


def _layer_result(
    i,
    kind,
    head_stats,
    dr: np.ndarray,
    r_norm: np.ndarray,
    input_change: np.ndarray,
    vector,
    baseline: float,
    stats: StatOptions,
) -> dict[str, Any]:
    d2, b2, a2, dot = (np.stack([h[j] for h in head_stats]) for j in range(4))  # [C, H] each
    rel_c = np.sqrt(_ratio(d2.sum(1), b2.sum(1)))
    cos_c = _cos(dot.sum(1), a2.sum(1), b2.sum(1))
    rel, cos = _mean_ci(rel_c, stats), _mean_ci(cos_c, stats)
    dr_norm = np.linalg.norm(dr, axis=1)
    readout = bootstrap((dr_norm, r_norm), lambda a, b: _ratio(a.sum(-1), b.sum(-1)), **stats.kw)
    out: dict[str, Any] = {
        "layer": i,
        "kind": kind,
        "rel_change": rel.value,
        "rel_change_ci": rel.as_list(),
        "cosine": cos.value,
        "cosine_ci": cos.as_list(),
        "input_change": float(input_change.mean()),
        "readout_change": readout.value,
        "readout_change_ci": readout.as_list(),
        "alignment": None,
        "alignment_ci": None,
        "axis_share": None,
        "baseline": baseline,
        "heads": [
            {
                "head": h,
                "rel_change": float(np.sqrt(_ratio(d2[:, h], b2[:, h])).mean()),
                "cosine": float(_cos(dot[:, h], a2[:, h], b2[:, h]).mean()),
            }
            for h in range(d2.shape[1])
        ],
    }
    if vector is not None and i in vector.directions:
        u = vector.unit(i).double().numpy()
        al = _alignment_ci(dr, u, stats)
        energy = float((dr**2).sum())
        out.update(
            alignment=al.value,
            alignment_ci=al.as_list(),
            axis_share=float(((dr @ u) ** 2).sum() / energy) if energy > 0 else 0.0,
        )
    return out


def _alignment_ci(dr: np.ndarray, u: np.ndarray, stats: StatOptions) -> Interval:
    """cos(mean over contexts of dr, u), bootstrapped over contexts (resample weights, no [B, C, d] gather)."""

    def cos_of(mean: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(mean, axis=-1)
        return np.where(n > 0, (mean @ u) / np.where(n > 0, n, 1.0), 0.0)

    c = dr.shape[0]
    value = float(cos_of(dr.mean(0)))
    if c < 2:
        return Interval(value, float("nan"), float("nan"), stats.level)
    g = np.random.default_rng(np.random.SeedSequence(stats.boot_seed))
    idx = g.integers(0, c, size=(stats.n_boot, c))
    counts = np.zeros((stats.n_boot, c))
    np.add.at(counts, (np.arange(stats.n_boot)[:, None], idx), 1.0)
    return interval(value, cos_of(counts @ dr / c), stats.level)


def _markdown(data, stats: StatOptions) -> str:
    rows = []
    for r in data["layers"]:
        rel = fmt_ci(Interval(r["rel_change"], *r["rel_change_ci"], stats.level), sign=False)
        ro = fmt_ci(Interval(r["readout_change"], *r["readout_change_ci"], stats.level), sign=False)
        al = "n/a" if r["alignment"] is None else fmt_ci(Interval(r["alignment"], *r["alignment_ci"], stats.level))
        hot = sorted(r["heads"], key=lambda h: -h["rel_change"])[:3]
        rows.append(
            [
                str(r["layer"]),
                r["kind"],
                rel,
                fmt(r["cosine"], 4),
                fmt(r["input_change"], 3),
                ro,
                al,
                ", ".join(f"{h['head']}: {fmt(h['rel_change'], 2)}" for h in hot),
            ]
        )
    vec = (
        "no steering vector given: alignment not measured"
        if data["vector"] is None
        else f"steering vector layers {data['vector']['layers']} ({data['vector']['method']})"
    )
    lines = [
        "# apollo-fast probe gdn-state",
        "",
        f"Base `{data['base']}` against trained `{data['trained']}` ({data['arch']}), {data['n_contexts']} held-out "
        f"contexts ({min(data['context_tokens'])}-{max(data['context_tokens'])} tokens); {vec}.",
        "",
        table(
            [
                "layer",
                "kind",
                f"state rel. change [{stats.pct} CI]",
                "state cosine",
                "input change",
                "readout change",
                "alignment with steering",
                "most changed heads",
            ],
            rows,
        ),
        "",
        f"Random-direction baseline for |alignment| ({stats.pct} quantile in {data['hidden_size']} dimensions): "
        f"{fmt(data['baseline'], 3)}.",
        "",
        "State: GDN recurrent state [Hv, dk, dv] / attention keys and values after the context. Readout: the "
        "layer's token-mixer output for the next token, trained weights, with the layer's state before vs after "
        "(the change attributable to the state). Alignment: cosine of the mean readout change with the steering "
        "direction at that layer. Input change: relative change of the layer's input at up to 64 context positions "
        "(nonzero when earlier layers changed).",
        ci_note(stats, "contexts"),
        "",
        "![gdn-state](gdn_state.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(data, stats: StatOptions) -> bytes:
    layers = data["layers"]
    gdn = [r for r in layers if r["kind"] == "gdn"]
    fig, axes = new_figure(14, 4.2, ncols=3)
    x = np.array([r["layer"] for r in layers])
    colors = ["tab:blue" if r["kind"] == "gdn" else "tab:orange" for r in layers]
    ax = axes[0]
    vals = np.array([r["rel_change"] for r in layers])
    err = np.array(
        [[r["rel_change"] - r["rel_change_ci"][0], r["rel_change_ci"][1] - r["rel_change"]] for r in layers]
    ).T
    ax.bar(x, vals, color=colors, yerr=np.nan_to_num(err), capsize=2)
    ax.set_xticks(x[:: max(1, len(x) // 16)])
    ax.set_xlabel("layer (blue: GDN, orange: attention)")
    ax.set_ylabel("||S_after - S_before|| / ||S_before||")
    ax.set_title("state change")
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    b = data["baseline"]
    ax.axhspan(-b, b, color="0.85", label=f"random directions ({stats.pct})")
    ax.axhline(0, color="0.4", linewidth=0.8)
    have = [r for r in layers if r["alignment"] is not None]
    if have:
        xs = [r["layer"] for r in have]
        ys = [r["alignment"] for r in have]
        e = np.array([[r["alignment"] - r["alignment_ci"][0], r["alignment_ci"][1] - r["alignment"]] for r in have]).T
        ax.errorbar(
            xs,
            ys,
            yerr=np.nan_to_num(e),
            fmt="o",
            color="tab:green",
            capsize=3,
            label="cos(mean readout change, steering)",
        )
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(x[:: max(1, len(x) // 16)])
    ax.set_xlabel("layer")
    ax.set_title("readout change vs steering direction" if have else "alignment (no steering vector given)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    if gdn:
        heat = np.array([[h["rel_change"] for h in r["heads"]] for r in gdn])
        im = ax.imshow(heat, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(gdn)))
        ax.set_yticklabels([str(r["layer"]) for r in gdn])
        ax.set_xlabel("value head")
        ax.set_ylabel("GDN layer")
        fig.colorbar(im, ax=ax, label="state rel. change")
    ax.set_title("GDN state change per head")
    return png_bytes(fig)
