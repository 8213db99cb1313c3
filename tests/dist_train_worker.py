"""One rank of the `apollo-fast train --fsdp` checks (run by tests/test_train_fsdp.py under torchrun).

    python -m torch.distributed.run --nproc-per-node N tests/dist_train_worker.py JOBS.json

JOBS.json: a list of {"config": {TrainConfig fields}, "gathered": PATH, "copy": [SRC, DST, STEP], "errors": PATH}
(all but "config" optional).
Every rank runs each job with apollo_fast.training.loop.train(TrainConfig(**config, fsdp=True)) inside the one
process group this worker makes. "copy": first rank 0 copies run folder SRC to DST as a kill right after
checkpoint STEP would have left it (truncated_copy). "gathered": rank 0 also saves the trained model's weights
as gathered from the shards (fsdp.full_state_dict), to compare with the model folder the run wrote. "errors":
the job is expected to fail; rank 0 writes what each rank raised (type and message), a JSON list by rank.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from apollo_fast.training import fsdp
from apollo_fast.training.loop import TrainConfig, train


def truncated_copy(src: str | Path, dst: str | Path, keep_step: int) -> Path:
    """A copy of run folder `src` as a kill right after its checkpoint `keep_step` would leave it."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "model")
    for ck in (dst / "checkpoints").iterdir():
        if int(ck.name.split("-")[1]) > keep_step:
            shutil.rmtree(ck)
    return dst


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    for job in jobs:
        if job.get("copy") and dist.get_rank() == 0:
            truncated_copy(*job["copy"])
        dist.barrier()
        if job.get("errors"):
            try:
                train(TrainConfig(**job["config"], fsdp=True))
                raised = None
            except Exception as err:  # noqa: BLE001 - recorded for the test to judge
                raised = [type(err).__name__, str(err)]
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, raised)
            if dist.get_rank() == 0:
                Path(job["errors"]).write_text(json.dumps(everyone))
            continue
        result = train(TrainConfig(**job["config"], fsdp=True))
        if job.get("gathered"):
            weights = fsdp.full_state_dict(result.model)
            if dist.get_rank() == 0:
                torch.save(weights, job["gathered"])
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
