"""The loss history of a run: a CSV and a PNG plot, both written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_text

__all__ = ["new_history", "write_loss_csv", "write_loss_plot", "HISTORY_KEYS"]

# One entry per optimizer step. loss: the step's weighted loss; behaviour/general: mean loss of the
# step's items from that source (NaN when it had none); tokens: tokens run through the model;
# grad_norm: the total gradient norm before clipping (NaN when no parameter got a gradient).
HISTORY_KEYS = ("step", "loss", "behaviour", "general", "tokens", "lr", "seconds", "grad_norm")


def new_history() -> dict[str, list[float]]:
    return {key: [] for key in HISTORY_KEYS}


def write_loss_csv(history: dict[str, list[float]], path: str | Path) -> None:
    rows = [",".join(HISTORY_KEYS)]
    for values in zip(*(history[k] for k in HISTORY_KEYS), strict=True):
        rows.append(",".join("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" for v in values))
    atomic_write_text(path, "\n".join(rows) + "\n")


def _smooth(values: list[float], window: int) -> tuple[list[int], list[float]]:
    """Trailing mean over the last `window` finite values: (indices, means)."""
    idx, out, buf = [], [], []
    for i, v in enumerate(values):
        if math.isnan(v):
            continue
        buf.append(v)
        if len(buf) > window:
            buf.pop(0)
        idx.append(i)
        out.append(sum(buf) / len(buf))
    return idx, out


def write_loss_plot(history: dict[str, list[float]], path: str | Path, title: str = "apollo-fast train") -> None:
    """Per-step loss (faint) and its trailing mean, per source when general data is mixed in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot(1, 1, 1)
    steps = history["step"]
    window = max(1, len(steps) // 25)
    mixed = any(not math.isnan(v) for v in history["general"])
    series = [("behaviour", "tab:blue"), ("general", "tab:orange")] if mixed else [("loss", "tab:blue")]
    for key, color in series:
        values = history[key]
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if not math.isnan(v)]
        if not pts:
            continue
        ax.plot([s for s, _ in pts], [v for _, v in pts], color=color, alpha=0.25, linewidth=0.8)
        idx, means = _smooth(values, window)
        ax.plot([steps[i] for i in idx], means, color=color, linewidth=1.8, label=f"{key} (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if steps:
        ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
