"""`probe transfer`: perplexity (and, on pair sets, the behaviour margin) per evaluation set, before vs after.

Each set is scored by the base and by the trained model on the same items. The change of perplexity
exp(sum NLL / sum tokens) gets a paired bootstrap CI: items are resampled, and both models' perplexities
are computed on the same resample. Positive backward transfer on a set means a CI entirely below zero
(perplexity went down). Pair sets ({"prompt", "desired", "undesired"} lines) are scored on the desired
continuation (perplexity) and on the margin log p(desired) - log p(undesired) (paired bootstrap of the
mean margin change). Models are loaded one at a time, so a large model needs memory for one copy.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import DEFAULT_STATS, StatOptions, check_delta, ci_note
from .inputs import Pair, ProbeError, check_same_architecture, is_pairs_file, load_pairs, load_texts, open_model
from .report import Report, fmt, new_figure, png_bytes, table
from .scoring import item_nll, pair_logprobs
from .stats import bootstrap, verdict

__all__ = ["transfer"]

EvalSet = str | os.PathLike | Sequence[Any]


def _score(
    model: nn.Module, sets: dict[str, list[Any]], batch_size: int, frozen_from: int, progress: bool, which: str
) -> dict:
    """name -> (NLL per item, tokens per item, margin per pair or None)."""
    out = {}
    for name, items in sets.items():
        if isinstance(items[0], Pair):
            m = pair_logprobs(
                model, items, batch_size=batch_size, frozen_from=frozen_from, progress=progress, desc=f"{which}: {name}"
            )
            out[name] = (-m.desired, m.desired_tokens, m.margin)
        else:
            nll, tokens = item_nll(model, items, batch_size=batch_size, progress=progress, desc=f"{which}: {name}")
            out[name] = (nll, tokens, None)
    return out


def free_memory() -> None:
    """Collect a released model now (its GPU memory too) before the next one is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def transfer(
    base: str | os.PathLike | nn.Module,
    trained: str | os.PathLike | nn.Module,
    evals: Mapping[str, EvalSet],
    *,
    min_change: float = 0.01,
    min_effect: float = 0.1,
    stats: StatOptions = DEFAULT_STATS,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    chunk_tokens: int = 1024,
    frozen_from: int = 256,
    progress: bool = True,
) -> Report:
    """Per evaluation set (name -> file or items): perplexity before / after with a paired bootstrap CI.

    min_change: the smallest relative perplexity change that matters (0.01 = 1%): a CI within +-min_change
    of ppl_before is "no effect". min_effect: the same for the margin (nats) on pair sets.
    """
    stats.check()
    min_change = check_delta("min_change", min_change)
    min_effect = check_delta("min_effect", min_effect)
    if not evals:
        raise ProbeError("give at least one evaluation set (--eval NAME=FILE)")
    base_h = open_model(base, tokenizer, device=device, dtype=dtype, what="base model")
    trained_h = open_model(trained, base_h.tokenizer, device=device, dtype=dtype, what="trained model")
    check_same_architecture(base_h, trained_h)
    sets: dict[str, list[Any]] = {}
    for name, source in evals.items():
        if isinstance(source, (str, os.PathLike)):
            pairs = is_pairs_file(source)
        else:
            pairs = len(source) > 0 and _looks_like_pair(source[0])
        sets[name] = load_pairs(source, base_h) if pairs else load_texts(source, base_h, chunk_tokens=chunk_tokens)
    before = _score(base_h.load(), sets, batch_size, frozen_from, progress, "base")
    base_h.release()  # a model read from a folder is dropped before the trained one is read
    free_memory()
    after = _score(trained_h.load(), sets, batch_size, frozen_from, progress, "trained")
    results = [_compare(name, before[name], after[name], min_change, min_effect, stats) for name in sets]
    data = {
        "base": base_h.name,
        "trained": trained_h.name,
        "settings": {
            "min_change": min_change,
            "min_effect": min_effect,
            "level": stats.level,
            "n_boot": stats.n_boot,
            "boot_seed": stats.boot_seed,
        },
        "sets": results,
    }
    return Report("transfer", data, _markdown(data, stats), {"transfer.png": _plot(data, stats)})


def _looks_like_pair(x: Any) -> bool:
    return (
        isinstance(x, Pair)
        or (isinstance(x, dict) and ("desired" in x or "undesired" in x))
        or (isinstance(x, (tuple, list)) and len(x) == 3 and not isinstance(x[0], int))
    )


def _compare(name: str, before, after, min_change: float, min_effect: float, stats: StatOptions) -> dict:
    nll_b, tokens, margin_b = before
    nll_a, _, margin_a = after

    def ppl(nll: np.ndarray, tok: np.ndarray) -> np.ndarray:
        return np.exp(nll.sum(-1) / tok.sum(-1))

    ci = bootstrap((nll_a, nll_b, tokens), lambda a, b, t: ppl(a, t) - ppl(b, t), **stats.kw)
    rel = bootstrap((nll_a, nll_b, tokens), lambda a, b, t: ppl(a, t) / ppl(b, t) - 1.0, **stats.kw)
    ppl_before, ppl_after = float(ppl(nll_b, tokens)), float(ppl(nll_a, tokens))
    out = {
        "name": name,
        "kind": "pairs" if margin_b is not None else "text",
        "n_items": len(tokens),
        "tokens": int(tokens.sum()),
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "delta": ci.value,
        "ci": ci.as_list(),
        "rel_delta": rel.value,
        "rel_ci": rel.as_list(),
        # improving side for perplexity is below zero: 'positive' transfer when the CI lies below 0
        "verdict": _flip(verdict(rel, min_change)),
    }
    if margin_b is not None:
        m = bootstrap(margin_a - margin_b, lambda d: d.mean(-1), **stats.kw)
        out.update(
            margin_before=float(margin_b.mean()),
            margin_after=float(margin_a.mean()),
            margin_delta=m.value,
            margin_ci=m.as_list(),
            margin_verdict=_word(verdict(m, min_effect)),
        )
    return out


def _flip(v: str) -> str:
    """Perplexity: a CI below zero is the improving side."""
    return {"negative": "improves", "positive": "worsens"}.get(v, v)


def _word(v: str) -> str:
    return {"positive": "improves", "negative": "worsens"}.get(v, v)


def _markdown(data, stats: StatOptions) -> str:
    rows = []
    for s in data["sets"]:
        ci = f"{fmt(s['delta'], 3, True)} [{fmt(s['ci'][0], 3, True)}, {fmt(s['ci'][1], 3, True)}]"
        rel = f"{100 * s['rel_delta']:+.2f}%" if s["rel_delta"] is not None else "n/a"
        margin = (
            ""
            if s["kind"] == "text"
            else (
                f"{fmt(s['margin_delta'], 3, True)} [{fmt(s['margin_ci'][0], 3, True)}, "
                f"{fmt(s['margin_ci'][1], 3, True)}] ({s['margin_verdict']})"
            )
        )
        rows.append(
            [
                s["name"],
                s["kind"],
                str(s["n_items"]),
                str(s["tokens"]),
                fmt(s["ppl_before"], 4),
                fmt(s["ppl_after"], 4),
                ci,
                rel,
                s["verdict"],
                margin,
            ]
        )
    lines = [
        "# apollo-fast probe transfer",
        "",
        f"Base `{data['base']}` against trained `{data['trained']}`, on the same items.",
        "",
        table(
            [
                "set",
                "kind",
                "items",
                "tokens",
                "ppl before",
                "ppl after",
                f"change [{stats.pct} CI]",
                "relative",
                "perplexity",
                "margin change, nats",
            ],
            rows,
        ),
        "",
        "Perplexity verdicts: no effect: the relative change's CI lies within "
        f"+-{100 * data['settings']['min_change']:g}%; otherwise improves / worsens: the CI lies below / above zero "
        "(improves on a set you did not train on is positive backward transfer); not enough data to tell: the CI "
        "holds zero and reaches beyond that. Margin verdicts the same, with "
        f"+-{data['settings']['min_effect']:g} nats.",
        ci_note(stats, "items, paired (both models scored on each resample)"),
        "",
        "![transfer](transfer.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(data, stats: StatOptions) -> bytes:
    """Forest plot of ln(ppl_after / ppl_before) (the change of NLL per token, symmetric for gains and losses)."""
    sets = data["sets"]
    fig, (ax,) = new_figure(7, 1.4 + 0.55 * len(sets))
    y = np.arange(len(sets))[::-1]
    band = data["settings"]["min_change"]
    ax.axvspan(
        np.log1p(-min(band, 0.999)), np.log1p(band), color="0.85", label=f"|change| < {100 * band:g}% (no effect)"
    )
    ax.axvline(0, color="0.4", linewidth=0.8)
    for yi, s in zip(y, sets, strict=True):
        if s["rel_delta"] is None or None in s["rel_ci"]:
            continue
        mid, lo, hi = (float(np.log1p(v)) for v in (s["rel_delta"], *s["rel_ci"]))
        color = {"improves": "tab:green", "worsens": "tab:red"}.get(s["verdict"], "tab:gray")
        ax.errorbar([mid], [yi], xerr=[[mid - lo], [hi - mid]], fmt="o", color=color, capsize=4)
        ax.annotate(
            f"{100 * s['rel_delta']:+.1f}%",
            (mid, yi),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_yticks(y)
    ax.set_yticklabels([s["name"] for s in sets])
    ax.set_ylim(-0.7, len(sets) - 0.3)
    ax.set_xlabel(f"ln(ppl after / ppl before) = NLL change per token (nats), {stats.pct} CI")
    ax.set_title("transfer: left of zero = the set got better")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return png_bytes(fig)
