"""Do bf16 weights learn at fine-tuning learning rates? Each `param_rounding` mode against the fp32 trajectory.

A tiny Llama (hidden 128, 2 layers, init std 0.02) trains on the demo's permutation task with APOLLO (rank 16)
for 40 steps, in fp32 and in bf16 with each rounding mode, from the same (bf16-representable) initial weights
and on the same batches. For the attention q_proj weights it reports, per mode and learning rate:
    changed    share of elements whose stored value moved at all
    norm       ||dW|| / ||dW_fp32||  (dW = W_40 - W_0, the realised update)
    cosine     cos(dW, dW_fp32)
and for 'stochastic' also the cosine of the update averaged over 4 seeds (unbiased rounding averages out;
the fp32 side is averaged over the same seeds, since the seed also keys the projection). Then the task's
training loss per mode against fp32 over a longer run, as a PNG. CPU, a few minutes.

    python benches/bench_bf16_updates.py [--out DIR] [--steps 40] [--loss-steps 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from apollo_fast import APOLLO, apollo_param_groups
from apollo_fast.toy import PermutationTask, tiny_causal_lm

MODES = ("nearest", "stochastic", "compensated")


def _model(dtype: torch.dtype, init: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = tiny_causal_lm(vocab=64, hidden=128, layers=2, heads=4, seed=0)
    model.load_state_dict(init)
    return model.to(dtype)


def _train(dtype, init, lr, steps, mode="nearest", seed=0, batch=16, record_loss=False):
    """Train from `init`; returns ({q_proj name: W_final fp32}, losses)."""
    model = _model(dtype, init)
    task = PermutationTask(vocab=64, seed=0)
    gen_state = torch.get_rng_state()
    torch.manual_seed(1234)  # the same batches for every run
    batches = [task.batch(batch, torch.device("cpu")) for _ in range(steps)]
    torch.set_rng_state(gen_state)
    opt = APOLLO(apollo_param_groups(model, rank=16), lr=lr, rank=16, seed=seed, param_rounding=mode)
    losses = []
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if record_loss:
            losses.append(float(loss.detach()))
    qs = {n: p.detach().float().clone() for n, p in model.named_parameters() if n.endswith("q_proj.weight")}
    return qs, losses


def _stats(final: dict, ref_final: dict, w0: dict) -> dict[str, float]:
    d = torch.cat([(final[n] - w0[n]).flatten() for n in final])
    d_ref = torch.cat([(ref_final[n] - w0[n]).flatten() for n in final])
    return {
        "changed": float((d != 0).float().mean()),
        "norm": float(d.norm() / d_ref.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(d, d_ref, dim=0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--loss-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = tiny_causal_lm(vocab=64, hidden=128, layers=2, heads=4, seed=0)
    init = {k: v.to(torch.bfloat16).float() for k, v in base.state_dict().items()}  # bf16-representable start
    w0 = {n: init[n] for n in init if n.endswith("q_proj.weight")}
    rows = []
    for lr in (1e-5, 1e-4):
        refs = [_train(torch.float32, init, lr, args.steps, seed=s)[0] for s in range(args.seeds)]
        for mode in MODES:
            final, _ = _train(torch.bfloat16, init, lr, args.steps, mode=mode)
            row = {"lr": lr, "mode": mode, **_stats(final, refs[0], w0)}
            if mode == "stochastic":
                finals = [final] + [
                    _train(torch.bfloat16, init, lr, args.steps, mode=mode, seed=s)[0] for s in range(1, args.seeds)
                ]
                mean = {n: sum(f[n] for f in finals) / len(finals) for n in final}
                mean_ref = {n: sum(r[n] for r in refs) / len(refs) for n in final}
                row["seed_mean_cosine"] = _stats(mean, mean_ref, w0)["cosine"]
            rows.append(row)
            print(json.dumps(row))

    curves = {"fp32": _train(torch.float32, init, 1e-4, args.loss_steps, record_loss=True)[1]}
    for mode in MODES:
        curves[f"bf16 {mode}"] = _train(torch.bfloat16, init, 1e-4, args.loss_steps, mode=mode, record_loss=True)[1]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "loss_steps": args.loss_steps,
    }
    (out / "bench_bf16_updates.json").write_text(json.dumps({"meta": meta, "rows": rows, "curves": curves}, indent=1))
    _plot(curves, out / "bf16_updates_loss.png")
    print(f"\n# bf16 updates vs fp32 — tiny Llama (hidden 128), APOLLO rank 16, {args.steps} steps; {meta}")
    print("| lr | mode | changed | norm vs fp32 | cosine vs fp32 | seed-mean cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        sm = f"{r['seed_mean_cosine']:.3f}" if "seed_mean_cosine" in r else ""
        print(f"| {r['lr']:.0e} | {r['mode']} | {r['changed']:.1%} | {r['norm']:.3f} | {r['cosine']:.3f} | {sm} |")
    w = 20
    print(f"\n| run | loss at step 1 | mean of the last {w} steps (lr 1e-4, {args.loss_steps} steps) |")
    print("| --- | --- | --- |")
    for name, losses in curves.items():
        print(f"| {name} | {losses[0]:.4f} | {sum(losses[-w:]) / w:.4f} |")


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    ref = curves["fp32"]
    for name, losses in curves.items():
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, label=name, linewidth=1.2)
        dx.plot(steps, [a - b for a, b in zip(losses, ref, strict=True)], linewidth=1.2)
    ax.set_ylabel("training loss")
    ax.set_title("bf16 weights vs fp32, APOLLO rank 16, lr 1e-4 (tiny Llama, permutation task)")
    ax.legend()
    dx.set_ylabel("loss - fp32 loss")
    dx.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
