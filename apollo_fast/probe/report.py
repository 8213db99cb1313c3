"""A probe's result: strict JSON, a markdown report and PNG plots, written atomically.

`Report.save(DIR)` writes DIR/report.md, DIR/report.json and the plots; the folder appears at once
(built under a temporary name, then renamed), and an existing non-empty folder is replaced only with
overwrite=True. `Report.write_json(PATH)` writes the JSON alone. JSON is strict: NaN and infinities
are written as null.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir, atomic_write_text
from .inputs import check_output
from .stats import Interval

__all__ = ["Report", "jsonable", "fmt", "fmt_ci", "new_figure", "png_bytes", "table"]


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, Interval to [lo, hi], non-finite floats to None."""
    if isinstance(value, Interval):
        return [jsonable(value.lo), jsonable(value.hi)]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def fmt(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}g}" if sign else f"{x:.{digits}g}"


def fmt_ci(iv: Interval, digits: int = 3, sign: bool = True, pct: bool = False) -> str:
    """'+0.52 [+0.31, +0.74]' (or percentages)."""
    if pct:
        f = lambda v: "n/a" if not math.isfinite(v) else f"{100 * v:+.1f}%" if sign else f"{100 * v:.1f}%"
    else:
        f = lambda v: fmt(v, digits, sign)
    return f"{f(iv.value)} [{f(iv.lo)}, {f(iv.hi)}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def new_figure(width: float = 8.0, height: float = 4.5, ncols: int = 1):
    """A matplotlib figure on the Agg canvas (pyplot's global backend untouched) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def png_bytes(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass
class Report:
    """data: the JSON-ready result; markdown: the human report; figures: PNG file name -> bytes."""

    probe: str
    data: dict[str, Any]
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(jsonable({"probe": self.probe, **self.data}), indent=2, allow_nan=False) + "\n"

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write report.md, report.json and the plots into the folder `out` (created atomically)."""
        check_output(out, overwrite=overwrite, folder=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "report.md").write_text(self.markdown)
            (tmp / "report.json").write_text(self.to_json())
            for name, data in self.figures.items():
                (tmp / name).write_bytes(data)
        return Path(out)

    def write_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the JSON alone to `path` (atomically; an existing file only with overwrite=True)."""
        check_output(path, overwrite=overwrite, folder=False)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, self.to_json())
