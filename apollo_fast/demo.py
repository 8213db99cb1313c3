"""`apollo-fast demo`: APOLLO, APOLLO-Mini and AdamW side by side on a tiny model and task."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from .optim import APOLLO, apollo_param_groups
from .toy import PermutationTask, tiny_causal_lm

__all__ = ["register", "run_demo", "DemoResult", "optimizer_state_bytes"]


@dataclass
class DemoResult:
    name: str
    first_loss: float
    final_loss: float
    ms_per_step: float
    state_bytes: int


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (what a checkpoint of it would hold)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _make_optimizer(name: str, model: torch.nn.Module, rank: int) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    if name == "APOLLO":
        return APOLLO(apollo_param_groups(model), lr=1e-2, rank=rank)
    if name == "APOLLO-Mini":
        return APOLLO.mini(apollo_param_groups(model), lr=1e-2)
    raise ValueError(name)


def run_demo(
    steps: int = 150,
    batch_size: int = 16,
    rank: int = 16,
    device: str | None = None,
    seed: int = 0,
    optimizers: tuple[str, ...] = ("APOLLO", "APOLLO-Mini", "AdamW"),
    progress: bool = True,
) -> list[DemoResult]:
    """Train the same tiny Llama-style model with each optimizer; return one result per optimizer."""
    from tqdm.auto import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = []
    for name in optimizers:
        model = tiny_causal_lm(seed=seed).to(dev)
        task = PermutationTask(vocab=model.config.vocab_size, seed=seed)
        opt = _make_optimizer(name, model, rank)
        losses, elapsed = [], 0.0
        bar = tqdm(range(steps), desc=f"{name:<11}", disable=not progress, leave=True)
        for _ in bar:
            x = task.batch(batch_size, dev)
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - t0
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        final = sum(losses[-10:]) / min(10, len(losses))
        results.append(DemoResult(name, losses[0], final, 1e3 * elapsed / steps, optimizer_state_bytes(opt)))
    return results


def print_table(results: list[DemoResult], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"apollo-fast demo: tiny Llama, permutation task, {device}")
    for col in ("optimizer", "first loss", "final loss (last 10)", "ms / step", "optimizer state"):
        table.add_column(col, justify="right")
    for r in results:
        state = f"{r.state_bytes / 1024:.1f} KiB"
        table.add_row(r.name, f"{r.first_loss:.3f}", f"{r.final_loss:.3f}", f"{r.ms_per_step:.1f}", state)
    Console().print(table)


def _main(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = run_demo(steps=args.steps, batch_size=args.batch_size, rank=args.rank, device=args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print_table(results, device)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny model with APOLLO, APOLLO-Mini and AdamW side by side")
    p.add_argument("--steps", type=int, default=150, help="training steps per optimizer (default 150)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=16, help="APOLLO rank (default 16: hidden 64 / 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.set_defaults(func=_main)
