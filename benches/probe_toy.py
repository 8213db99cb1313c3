"""Every `apollo-fast probe` on the CPU with tiny models and planted effects: reports and timings.

    python benches/probe_toy.py [--out DIR] [--only dose]

Writes DIR/<probe>/ (report.md, report.json, PNG) for each probe and DIR/probe_toy.json with the wall time of
each run; prints the timings as a markdown table. The README's probe report (docs/probe/) comes from here.
The planted models and data are those of the tests (tests/_probe_toys.py, apollo_fast.probe.toy).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from _probe_toys import feature_model, feature_pairs, hybrid_model, plant_gdn

    from apollo_fast.probe import TrainSettings, dose, gdn_state, learning_rate, steering, transfer
    from apollo_fast.probe.toy import MappingTask
    from apollo_fast.probe.training import train_run
    from apollo_fast.steering import SteeringVector
    from apollo_fast.toy import tiny_causal_lm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "probe_toy"))
    parser.add_argument("--only", nargs="*", default=None, help="probes to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    task = MappingTask(seed=0)
    fast = TrainSettings(lr=1e-2, epochs=3.0, rank=16)

    def llama(seed: int = 0):
        return tiny_causal_lm(vocab=64, hidden=32, layers=2, heads=4, seed=seed).eval()

    def run_dose():
        return dose(llama(), task.examples(64), task.pairs(40), ns=(2, 4, 8, 16, 32, 64), seeds=3, settings=fast)

    def run_lr():
        return learning_rate(
            llama(),
            task.examples(64),
            task.pairs(40),
            lrs=(1e-4, 1e-3, 3e-3, 1e-2, 3e-2),
            n=32,
            seeds=3,
            general=task.texts(20),
            settings=TrainSettings(epochs=3.0, rank=16),
        )

    def run_transfer():
        base = llama()
        trained = copy.deepcopy(base)
        train_run(trained, task.examples(64), fast, seed=0)
        return transfer(base, trained, {"behaviour pairs": task.pairs(40), "random text": task.texts(20)})

    def run_gdn_state():
        base, common = hybrid_model()
        trained, direction = plant_gdn(base, common, layer=2, head=1, dim=3)
        g = torch.Generator().manual_seed(0)
        contexts = [
            torch.randint(0, 64, (int(n),), generator=g).tolist() for n in torch.randint(8, 30, (16,), generator=g)
        ]
        return gdn_state(
            base, trained, contexts, vector=SteeringVector({0: torch.randn(32, generator=g), 2: direction}, 32, 3)
        )

    def run_steering():
        model, _ = feature_model()
        return steering(model, feature_pairs(40), coefs=(1.0, 2.0, 4.0))

    probes = {
        "dose": run_dose,
        "lr": run_lr,
        "transfer": run_transfer,
        "gdn-state": run_gdn_state,
        "steering": run_steering,
    }
    timings = {}
    for name, fn in probes.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        report = fn()
        timings[name] = time.perf_counter() - t0
        report.save(out / name, overwrite=True)
        print(report.markdown)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": timings,
    }
    (out / "probe_toy.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("| probe | seconds (CPU, 1 thread) |\n| --- | --- |")
    for name, sec in timings.items():
        print(f"| {name} | {sec:.1f} |")


if __name__ == "__main__":
    main()
