"""`probe steering`: does a behaviour have a direction, per layer, and does steering along it move the behaviour?

For each behaviour's pair set and each layer, with K-fold cross-validation over pairs:

- separability: the direction is extracted from the training folds (`directions_from_differences`
  of the last-token hidden states of prompt + desired minus prompt + undesired: mean difference or
  PCA, as `apollo-fast steer extract`), and the held-out fold's sequences are projected on it. AUC:
  P(a desired sequence projects above an undesired one) over all held-out scores; accuracy: each
  sequence classified by the midpoint of the training folds' two class means. CIs: bootstrap over
  pairs. Null: the same cross-validation with each pair's labels swapped at random (a sign-flip
  permutation test, `n_perm` draws): p-value and the null AUC's quantile.
- steering effect: for the chosen layers and each coefficient, every held-out fold is scored with
  the training folds' direction added at that layer (`steer`, coefficient x direction), and the
  effect is the mean change of the held-out margin log p(desired) - log p(undesired) (nats).

Behaviours are ranked by their best layer's AUC, so "simple features only?" is answered with the
same measures for every behaviour. Steering needs full forwards (its hooks sit on the decoder
layers), so long prompts cost a full forward per sequence here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import DEFAULT_STATS, StatOptions, check_delta, check_ints, ci_note
from .inputs import MIN_ITEMS, Pair, ProbeError, check_finite, load_pairs, open_model
from .report import Report, fmt, fmt_ci, new_figure, png_bytes, table
from .scoring import eval_mode, pair_logprobs
from .stats import POSITIVE, Interval, auc, bootstrap, paired_auc_bootstrap, verdict

__all__ = ["steering", "cross_validated_scores"]

NO_FROZEN = 1 << 62  # steering hooks act on decoder layers: score with full forwards only


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 5])).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[perm] = np.arange(n) % k
    return fold


def _directions(diffs: torch.Tensor, method: str) -> torch.Tensor:
    from ..steering import directions_from_differences

    return directions_from_differences(diffs, method)


def cross_validated_scores(
    h_d: torch.Tensor, h_u: torch.Tensor, fold: np.ndarray, method: str, signs: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[torch.Tensor]]:
    """Held-out projections of desired / undesired hidden states [n, d] on the training folds' unit direction.

    signs [n] (+-1) swaps the labels of pairs with -1 (the permutation null). Returns (scores of desired,
    scores of undesired, per-sequence correctness [n, 2] by the training folds' midpoint, directions per fold).
    """
    if signs is not None:
        flip = (signs < 0)[:, None]
        h_d, h_u = torch.where(flip, h_u, h_d), torch.where(flip, h_d, h_u)
    n = h_d.shape[0]
    s_d, s_u, correct = np.zeros(n), np.zeros(n), np.zeros((n, 2))
    dirs = []
    for f in range(int(fold.max()) + 1):
        test = torch.from_numpy(fold == f)
        train = ~test
        v = _directions(h_d[train] - h_u[train], method)
        dirs.append(v)
        unit = v / v.norm().clamp_min(1e-30)
        mid = 0.5 * float((h_d[train] @ unit).mean() + (h_u[train] @ unit).mean())
        sd, su = (h_d[test] @ unit).double().numpy(), (h_u[test] @ unit).double().numpy()
        s_d[test.numpy()], s_u[test.numpy()] = sd, su
        correct[test.numpy()] = np.stack([sd > mid, su < mid], axis=1)
    return s_d, s_u, correct, dirs


def _null_aucs(h_d, h_u, fold, method: str, n_perm: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(int(seed) + 17)
    out = np.empty(n_perm)
    for r in range(n_perm):
        signs = torch.randint(0, 2, (h_d.shape[0],), generator=g) * 2 - 1
        s_d, s_u, _, _ = cross_validated_scores(h_d, h_u, fold, method, signs)
        out[r] = auc(s_d, s_u)
    return out


def steering(
    model: str | os.PathLike | nn.Module,
    behaviours: Mapping[str, str | os.PathLike | Sequence[Any]],
    *,
    layers: Sequence[int] | None = None,
    steer_layers: Sequence[int] | None = None,
    top_layers: int = 2,
    coefs: Sequence[float] = (1.0, 2.0, 4.0),
    folds: int = 5,
    method: str = "mean_diff",
    n_perm: int = 200,
    min_auc: float = 0.05,
    min_effect: float = 0.1,
    stats: StatOptions = DEFAULT_STATS,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> Report:
    """Per behaviour (name -> pairs) and layer: cross-validated separability and steering effect (module doc).

    layers: where separability is measured (default all); steer_layers: where steering is measured
    (default: each behaviour's `top_layers` best layers by AUC). min_auc: an AUC CI inside 0.5 +- min_auc is
    "not separable"; min_effect: a steering-effect CI inside +- min_effect nats is "no effect".
    """
    from tqdm.auto import tqdm

    stats.check()
    min_auc, min_effect = check_delta("min_auc", min_auc), check_delta("min_effect", min_effect)
    coefs = [check_finite("coefs (--coefs)", c) for c in coefs]
    if not coefs:
        raise ProbeError("coefs is empty")
    if not isinstance(folds, int) or folds < 2:
        raise ProbeError(f"folds must be an integer >= 2, got {folds!r}")
    if method not in ("mean_diff", "pca"):
        raise ProbeError(f"method must be mean_diff or pca, got {method!r}")
    if not isinstance(top_layers, int) or top_layers < 1:
        raise ProbeError(f"top_layers must be an integer >= 1, got {top_layers!r}")
    if not isinstance(n_perm, int) or 1 / (1 + max(n_perm, 0)) >= 1 - stats.level:
        need = int(np.ceil(1 / (1 - stats.level)))
        raise ProbeError(
            f"n_perm must be an integer >= {need} for a p-value below {1 - stats.level:.2g}, got {n_perm!r}"
        )
    if not behaviours:
        raise ProbeError("give at least one behaviour's pairs")
    handle = open_model(model, tokenizer, device=device, dtype=dtype)
    n_layers = int(handle.config.get_text_config().num_hidden_layers)
    layer_list = check_ints(
        "layers (--layers)", range(n_layers) if layers is None else layers, minimum=0, maximum=n_layers - 1
    )
    steer_fixed = (
        None
        if steer_layers is None
        else check_ints("steer_layers (--steer-layers)", steer_layers, minimum=0, maximum=n_layers - 1)
    )
    sets = {name: load_pairs(src, handle, minimum=max(MIN_ITEMS, 2 * folds)) for name, src in behaviours.items()}
    m = handle.load()
    pad_id = getattr(handle.tokenizer, "pad_token_id", None) or 0
    results = []
    for name, pairs in sets.items():
        fold = _folds(len(pairs), folds, stats.boot_seed)
        hd, hu = _hidden_states(m, pairs, layer_list, batch_size, pad_id)
        per_layer = {
            layer: _separability(hd[layer], hu[layer], fold, method, n_perm, min_auc, stats)
            for layer in tqdm(layer_list, desc=f"{name}: separability", unit="layer", leave=False, disable=not progress)
        }
        chosen = sorted(steer_fixed or sorted(layer_list, key=lambda i: -per_layer[i]["auc"])[:top_layers])
        dirs = {
            layer: per_layer[layer]["_dirs"]
            if layer in per_layer
            else cross_validated_scores(
                *(h[layer] for h in _hidden_states(m, pairs, [layer], batch_size, pad_id)), fold, method
            )[3]
            for layer in chosen
        }
        base, effects = _steering_effects(m, pairs, fold, dirs, coefs, min_effect, batch_size, stats, progress, name)
        for layer, rows in effects.items():
            per_layer.setdefault(layer, {"layer": layer})["steering"] = rows
        results.append(_behaviour_summary(name, pairs, base, per_layer))
    ranking = sorted(results, key=lambda r: -r["best_auc"])
    data = {
        "model": handle.name,
        "settings": {
            "folds": folds,
            "method": method,
            "coefs": coefs,
            "n_perm": n_perm,
            "min_auc": min_auc,
            "min_effect": min_effect,
            "level": stats.level,
            "n_boot": stats.n_boot,
            "boot_seed": stats.boot_seed,
            "layers": layer_list,
            "steer_layers": steer_fixed,
            "top_layers": top_layers,
        },
        "ranking": [r["name"] for r in ranking],
        "behaviours": results,
    }
    return Report("steering", data, _markdown(data, stats), {"steering.png": _plot(data, stats)})


def _hidden_states(m: nn.Module, pairs: list[Pair], layers: list[int], batch_size: int, pad_id: int):
    """Last-token hidden states of prompt + desired and prompt + undesired: ({layer: [n, d]}, {layer: [n, d]})."""
    from ..steering import hidden_at

    with eval_mode(m):
        hd = hidden_at(m, [p.prompt + p.desired for p in pairs], layers, -1, batch_size, pad_id)
        hu = hidden_at(m, [p.prompt + p.undesired for p in pairs], layers, -1, batch_size, pad_id)
    return hd, hu


def _separability(h_d, h_u, fold, method: str, n_perm: int, min_auc: float, stats: StatOptions) -> dict[str, Any]:
    """One layer: held-out AUC and accuracy with CIs, the permutation null, the verdict (and the folds' directions)."""
    s_d, s_u, correct, dirs = cross_validated_scores(h_d, h_u, fold, method)
    auc_ci = paired_auc_bootstrap(s_d, s_u, **stats.kw)
    acc_ci = bootstrap(correct.mean(1), lambda v: v.mean(-1), **stats.kw)
    null = _null_aucs(h_d, h_u, fold, method, n_perm, stats.boot_seed)
    p_value = float((1 + np.sum(null >= auc_ci.value)) / (1 + n_perm))
    v = verdict(auc_ci, min_auc, null=0.5)
    if v == POSITIVE and p_value >= 1 - stats.level:
        v = "not enough data to tell"  # the bootstrap CI clears 0.5 but the permutation null does not
    return {
        "auc": auc_ci.value,
        "auc_ci": auc_ci.as_list(),
        "accuracy": acc_ci.value,
        "accuracy_ci": acc_ci.as_list(),
        "null_auc": float(np.quantile(null, stats.level)),
        "p_value": p_value,
        "verdict": {"positive": "separable", "negative": "reversed", "no effect": "not separable"}.get(v, v),
        "steering": [],
        "_dirs": dirs,
    }


def _steering_effects(m, pairs, fold, dirs, coefs, min_effect, batch_size, stats, progress, name):
    """Base margins [n] and, per layer, per coefficient: the held-out margin change with each fold steered along
    the direction its training folds gave."""
    from tqdm.auto import tqdm

    from ..steering import SteeringVector, steer

    hidden, n_layers = int(m.get_input_embeddings().embedding_dim), int(m.config.get_text_config().num_hidden_layers)
    base = pair_logprobs(m, pairs, batch_size=batch_size, frozen_from=NO_FROZEN).margin
    out: dict[int, list[dict[str, Any]]] = {}
    n_folds = int(fold.max()) + 1
    with tqdm(
        total=len(dirs) * len(coefs) * n_folds, desc=f"{name}: steering", unit="run", leave=False, disable=not progress
    ) as bar:
        for layer, layer_dirs in dirs.items():
            out[layer] = []
            for c in coefs:
                on = np.zeros(len(pairs))
                for f, v in enumerate(layer_dirs):
                    test = np.flatnonzero(fold == f)
                    with steer(m, SteeringVector({layer: v}, hidden, n_layers), c, [layer]):
                        on[test] = pair_logprobs(
                            m, [pairs[i] for i in test], batch_size=batch_size, frozen_from=NO_FROZEN
                        ).margin
                    bar.update(1)
                eff = bootstrap(on - base, lambda d: d.mean(-1), **stats.kw)
                out[layer].append(
                    {"coef": c, "margin_change": eff.value, "ci": eff.as_list(), "verdict": verdict(eff, min_effect)}
                )
    return base, out


def _behaviour_summary(name: str, pairs: list[Pair], base: np.ndarray, per_layer: dict[int, dict]) -> dict[str, Any]:
    layers_out = [
        {"layer": i, **{k: v for k, v in per_layer[i].items() if not k.startswith("_") and k != "layer"}}
        for i in sorted(per_layer)
    ]
    best = max((r for r in layers_out if "auc" in r), key=lambda r: r["auc"])
    steer_rows = [(r["layer"], s) for r in layers_out for s in r.get("steering", [])]
    best_steer = max(steer_rows, key=lambda x: x[1]["ci"][0] if x[1]["ci"][0] is not None else -np.inf)
    return {
        "name": name,
        "n_pairs": len(pairs),
        "base_margin": float(base.mean()),
        "best_layer": best["layer"],
        "best_auc": best["auc"],
        "best_auc_ci": best["auc_ci"],
        "best_accuracy": best["accuracy"],
        "best_accuracy_ci": best["accuracy_ci"],
        "separability": best["verdict"],
        "best_steering": {"layer": best_steer[0], **best_steer[1]},
        "layers": layers_out,
    }


def _iv(value, ci, level) -> Interval:
    return Interval(
        value, ci[0] if ci[0] is not None else float("nan"), ci[1] if ci[1] is not None else float("nan"), level
    )


def _markdown(data, stats: StatOptions) -> str:
    s = data["settings"]
    rank_rows = []
    for k, name in enumerate(data["ranking"], start=1):
        b = next(r for r in data["behaviours"] if r["name"] == name)
        st = b["best_steering"]
        rank_rows.append(
            [
                str(k),
                name,
                str(b["n_pairs"]),
                str(b["best_layer"]),
                fmt_ci(_iv(b["best_auc"], b["best_auc_ci"], stats.level), sign=False),
                fmt_ci(_iv(b["best_accuracy"], b["best_accuracy_ci"], stats.level), sign=False, pct=True),
                b["separability"],
                f"{fmt_ci(_iv(st['margin_change'], st['ci'], stats.level))} (layer {st['layer']}, "
                f"coef {st['coef']:g}): {st['verdict']}",
            ]
        )
    lines = [
        "# apollo-fast probe steering",
        "",
        f"Model `{data['model']}`; {s['folds']}-fold cross-validation over pairs, direction: {s['method']} of the "
        f"last-token hidden-state differences; permutation null: {s['n_perm']} label swaps.",
        "",
        "## Ranking (best layer per behaviour)",
        "",
        table(
            [
                "rank",
                "behaviour",
                "pairs",
                "layer",
                f"held-out AUC [{stats.pct} CI]",
                "accuracy",
                "separability",
                "best steering effect on the margin, nats",
            ],
            rank_rows,
        ),
        "",
    ]
    for b in data["behaviours"]:
        rows = []
        for r in b["layers"]:
            steer_txt = (
                "; ".join(
                    f"x{x['coef']:g}: {fmt_ci(_iv(x['margin_change'], x['ci'], stats.level))}"
                    for x in r.get("steering", [])
                )
                or "-"
            )
            if "auc" in r:
                sep = [
                    fmt_ci(_iv(r["auc"], r["auc_ci"], stats.level), sign=False),
                    fmt(r["null_auc"], 3),
                    fmt(r["p_value"], 2),
                    r["verdict"],
                ]
            else:
                sep = ["-", "-", "-", "not measured (not in --layers)"]
            rows.append([str(r["layer"]), *sep, steer_txt])
        lines += [
            f"## {b['name']} ({b['n_pairs']} pairs; base margin {fmt(b['base_margin'], 3, True)} nats)",
            "",
            table(
                [
                    "layer",
                    "AUC",
                    f"null AUC ({stats.pct} q.)",
                    "p",
                    "separability",
                    "steering: margin change per coefficient",
                ],
                rows,
            ),
            "",
        ]
    lines += [
        f"Separable: the AUC's CI lies above 0.5 and the permutation p-value is below {1 - stats.level:.2g}; not "
        f"separable: the CI lies within 0.5 +- {s['min_auc']:g}; otherwise not enough data to tell. Steering "
        f"verdicts use +-{s['min_effect']:g} nats as the smallest effect of interest.",
        ci_note(stats, "pairs (held-out scores fixed)"),
        "",
        "![steering](steering.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(data, stats: StatOptions) -> bytes:
    fig, (ax, ax2) = new_figure(11, 4.2, ncols=2)
    ax.axhline(0.5, color="0.4", linewidth=0.8)
    for k, b in enumerate(data["behaviours"]):
        rows = [r for r in b["layers"] if "auc" in r]
        x = np.array([r["layer"] for r in rows])
        color = f"C{k}"
        ax.fill_between(x, [r["auc_ci"][0] for r in rows], [r["auc_ci"][1] for r in rows], color=color, alpha=0.2)
        ax.plot(x, [r["auc"] for r in rows], "o-", color=color, label=b["name"])
        ax.plot(x, [r["null_auc"] for r in rows], ":", color=color, linewidth=1)
        best = b["best_steering"]
        lay = next(r for r in b["layers"] if r["layer"] == best["layer"])
        cs = [x["coef"] for x in lay["steering"]]
        ys = [x["margin_change"] for x in lay["steering"]]
        err = np.array([[x["margin_change"] - x["ci"][0], x["ci"][1] - x["margin_change"]] for x in lay["steering"]]).T
        ax2.errorbar(
            cs,
            ys,
            yerr=np.nan_to_num(err),
            fmt="o-",
            color=color,
            capsize=3,
            label=f"{b['name']} (layer {best['layer']})",
        )
    ax.set_ylim(0, 1.02)
    ax.set_xticks(data["settings"]["layers"][:: max(1, len(data["settings"]["layers"]) // 16)])
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out AUC (dotted: permutation null)")
    ax.set_title("separability along the extracted direction")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax2.axhline(0, color="0.4", linewidth=0.8)
    ax2.set_xlabel("steering coefficient")
    ax2.set_ylabel("held-out margin change (nats)")
    ax2.set_title("steering effect")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    return png_bytes(fig)
