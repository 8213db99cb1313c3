"""APOLLO on sharded parameters (DTensor, FSDP2), under DDP, and through torch.distributed.checkpoint.

Real torch.distributed: each test runs its worker under torchrun with 2 and 3 CPU processes (gloo), one thread
each, a hard timeout and the whole process group killed on expiry. Tolerance: every parameter within 1e-5 of
the single-process run's weight change (||W_sharded - W_single|| / ||W_single - W_0||; measured <= 1.4e-6 with
the reference backend; with the Triton backend <= 9.4e-7 against one process's Triton step and against the
sharded reference step, FSDP2 <= 2.0e-6), bf16 bit for bit; a resume on the same world size bit for bit. The
Triton backend runs under the interpreter (TRITON_INTERPRET=1) with its scratch NaN-poisoned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torchrun_job import HERE, Job

CHANGE_RTOL = 1e-5
INTERPRET = {"TRITON_INTERPRET": "1"}  # backend='triton' on CPU tensors: the kernels run under the interpreter


def torchrun(nproc: int, script: str, *args: str, logs: Path, env: dict | None = None) -> None:
    """Run tests/`script` on `nproc` CPU ranks; fail with the ranks' output if it fails or hangs."""
    name = f"{Path(script).stem}-{'-'.join(a for a in args if not a.startswith('/'))}-{nproc}.log"
    code, out = Job(nproc, HERE / script, *args, logs=logs / name, env=env).finish()
    assert code == 0, f"{script} on {nproc} ranks failed:\n{out[-4000:]}"


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_parameters_equal_the_single_process_run(tmp_path, world):
    """Shard(0) and Shard(1) of tall, wide, square and uneven matrices (one with fewer rows than ranks),
    7 steps with refreshes, weight decay and the limiter; channel and tensor scaling and an AdamW matrix in
    mixed groups; the official projection; bf16 with stochastic and compensated rounding. And a NaN in one
    rank's shard: every rank raises (naming the parameter) or skips, and nothing changes."""
    out = tmp_path / "results.jsonl"
    torchrun(world, "dist_apollo_worker.py", "all", str(out), logs=tmp_path)
    results = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(results) == {"channel", "mixed", "official", "bf16", "bf16c", "nonfinite"}
    for name in ("channel", "mixed", "official"):
        assert results[name]["worst"] <= CHANGE_RTOL, f"{name} on {world} ranks: {results[name]['worst']:.2e}"
    for name in ("bf16", "bf16c"):
        assert results[name]["worst"] == 0.0, f"{name} on {world} ranks differs from one process"
    nf = results["nonfinite"]
    assert nf["agree"], f"ranks took different decisions: {nf}"
    assert nf["raise"] == "raised naming layer.weight, unchanged" and nf["skip"] == "skipped=1, unchanged", nf


def _check_triton(results: dict, world: int, bf16_bits: bool = True) -> None:
    assert set(results) == {"mixed", "official", "bf16", "capturable", "nonfinite"}
    for name in ("mixed", "official", "capturable", "bf16"):
        for key in ("worst", "worst_ref"):
            err = results[name][key]
            assert err <= CHANGE_RTOL, f"{name} on {world} ranks, {key}: {err:.2e}"
    if bf16_bits:
        assert results["bf16"]["differ"] == 0.0, f"bf16 on {world} ranks differs from one process"
    else:  # NCCL sums R over the ranks in another order than one process's GEMM: a rare rounding flip
        assert results["bf16"]["differ"] <= 0.01, results["bf16"]
    nf = results["nonfinite"]
    assert nf["agree"], f"ranks took different decisions: {nf}"
    assert nf["raise"] == "raised naming layer.weight, unchanged", nf
    assert nf["skip"] == nf["capturable"] == "skipped=1, unchanged", nf


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_triton_equals_single_process_and_reference(tmp_path, world):
    """backend='triton' on the same matrices and placements: mixed groups (channel and tensor scaling, the
    limiter, weight decay, an AdamW matrix and vectors), the official projection, bf16 with stochastic and
    compensated rounding, capturable (device step counters, lr a tensor), 7 steps with refreshes; equal to one
    process's Triton step and to the sharded reference step. A NaN in one rank's shard: every rank raises,
    skips, or (capturable) skips on the device, and nothing changes."""
    out = tmp_path / "results.jsonl"
    torchrun(world, "dist_apollo_worker.py", "all", str(out), "--backend", "triton", logs=tmp_path, env=INTERPRET)
    _check_triton({r["case"]: r for r in map(json.loads, out.read_text().splitlines())}, world)


def _change_err(path: Path, single: dict, init: dict) -> float:
    got = torch.load(path, weights_only=True)
    return max(
        float((got[k].double() - single[k].double()).norm() / (single[k].double() - init[k].double()).norm())
        for k in single
    )


def test_fsdp2_training_checkpoint_reshard_and_ddp(tmp_path):
    """FSDP2 (fully_shard per layer) on 2 ranks equals one process; a DCP checkpoint of model and optimizer
    saved on 2 ranks continues on 3 on the same trajectory, and on 2 bit for bit; loading the model without the
    optimizer state does not (the check can fail); DDP on 2 ranks equals one process."""
    sys.path.insert(0, str(HERE))
    from dist_fsdp_worker import make

    torchrun(2, "dist_fsdp_worker.py", "fsdp-save", str(tmp_path), logs=tmp_path)
    torchrun(3, "dist_fsdp_worker.py", "fsdp-load", str(tmp_path), logs=tmp_path)
    torchrun(2, "dist_fsdp_worker.py", "fsdp-load", str(tmp_path), logs=tmp_path)
    torchrun(3, "dist_fsdp_worker.py", "fsdp-load-model", str(tmp_path), logs=tmp_path)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    init = {k: v.detach() for k, v in make().named_parameters()}
    assert _change_err(tmp_path / "fsdp-save-w2.pt", single, init) <= CHANGE_RTOL
    assert _change_err(tmp_path / "fsdp-load-w3.pt", single, init) <= CHANGE_RTOL
    saved, resumed = (torch.load(tmp_path / f, weights_only=True) for f in ("fsdp-save-w2.pt", "fsdp-load-w2.pt"))
    for k in saved:
        assert torch.equal(saved[k], resumed[k]), f"{k}: the same-world resume is not bit-identical"
    assert _change_err(tmp_path / "fsdp-load-model-w3.pt", single, init) > 1e-2, "optimizer state had no effect"
    torchrun(2, "dist_fsdp_worker.py", "ddp", str(tmp_path), logs=tmp_path)
    assert _change_err(tmp_path / "ddp-w2.pt", single, init) <= CHANGE_RTOL


def test_fsdp2_triton_training_and_reshard(tmp_path):
    """FSDP2 (fully_shard per layer) with backend='triton' on 2 ranks equals one process's Triton and reference
    runs; its DCP checkpoint continues on 3 ranks with the Triton backend on the same trajectory."""
    sys.path.insert(0, str(HERE))
    from dist_fsdp_worker import STEPS, make, optimizer, train_step

    torchrun(2, "dist_fsdp_worker.py", "fsdp-save", str(tmp_path), "--backend", "triton", logs=tmp_path, env=INTERPRET)
    torchrun(3, "dist_fsdp_worker.py", "fsdp-load", str(tmp_path), "--backend", "triton", logs=tmp_path, env=INTERPRET)
    model = make()  # the single-process reference run (the worker's default backend)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = optimizer(model)
    for step in range(STEPS):
        train_step(model, opt, step, 0, 1)
    reference = {k: v.detach() for k, v in model.named_parameters()}
    single = torch.load(tmp_path / "single-triton.pt", weights_only=True)
    for name in ("fsdp-save-w2-triton.pt", "fsdp-load-w3-triton.pt"):
        assert _change_err(tmp_path / name, single, init) <= CHANGE_RTOL, name
        assert _change_err(tmp_path / name, reference, init) <= CHANGE_RTOL, name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_sharded_triton_on_two_gpus_nccl(tmp_path):
    """The Triton checks on 2 GPUs with NCCL (compiled kernels; the GEMMs in ieee fp32, as the reference's)."""
    out = tmp_path / "results.jsonl"
    env = {"APOLLO_FAST_DOT_PRECISION": "ieee", "TRITON_INTERPRET": "0"}
    torchrun(
        2, "dist_apollo_worker.py", "all", str(out), "--backend", "triton", "--device", "cuda", logs=tmp_path, env=env
    )
    _check_triton({r["case"]: r for r in map(json.loads, out.read_text().splitlines())}, 2, bf16_bits=False)
    torchrun(2, "dist_apollo_worker.py", "all", str(out), "--device", "cuda", logs=tmp_path, env=env)
    results = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    for name in ("channel", "mixed", "official"):
        assert results[name]["worst"] <= CHANGE_RTOL, f"{name} with NCCL: {results[name]['worst']:.2e}"
    assert results["nonfinite"]["agree"], results["nonfinite"]


def test_comm_table_counts_the_collectives_buffers():
    """benches/comm_table.py's per-matrix buffer sizes equal those the Triton backend allocates for FSDP2's Shard(0)
    (one process: the layout per rank block is checked by the multi-rank tests' results)."""
    import importlib.util

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from apollo_fast import APOLLO

    sys.path.insert(0, str(HERE.parent / "benches"))
    spec = importlib.util.spec_from_file_location("comm_table", HERE.parent / "benches" / "comm_table.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    shapes = [(12, 5), (5, 12), (3, 40), (9, 9)]  # tall, wide, wide with min side below the rank, square
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for scale_type in ("channel", "tensor"):
            ps = [torch.nn.Parameter(distribute_tensor(torch.randn(s), mesh, [Shard(0)])) for s in shapes]
            opt = APOLLO(ps, lr=1e-2, rank=4, backend="triton", scale_type=scale_type)
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
            (comm,) = next(iter(opt._launches.values())).comms
            want = [ct.apollo_buffers(s, 4, 1) for s in shapes]
            assert comm.rs_send.numel() == sum(w["reduce_scatter"] for w in want) > 0
            assert comm.sums.numel() == sum(w["all_reduce"] for w in want)
            # with tensor scaling the buffer is written by the scale kernel instead of all-gathered (the table: 0 B)
            assert comm.gathered.numel() == sum(w["all_gather"] for w in want) > 0
    finally:
        dist.destroy_process_group()


def test_unsupported_placements_are_refused_by_name():
    """A 2-D mesh or a Replicate placement raises ValueError naming the parameter (checked in one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from apollo_fast import APOLLO

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
        opt = APOLLO([{"params": [p], "param_names": ["blk.w"]}], rank=2)
        p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
        with pytest.raises(ValueError, match=r"blk\.w.*only Shard"):
            opt.step()
        mesh2 = init_device_mesh("cpu", (1, 1))
        q = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh2, [Replicate(), Replicate()]))
        opt = APOLLO([{"params": [q], "param_names": ["blk.q"]}], rank=2)
        q.grad = distribute_tensor(torch.randn(4, 3), mesh2, [Replicate(), Replicate()])
        with pytest.raises(ValueError, match=r"blk\.q.*2-D device mesh"):
            opt.step()
        shard = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        assert APOLLO([shard], backend="triton")._backend_impl == "triton"  # sharded parameters run on Triton
        assert APOLLO([shard], backend="auto")._backend_impl == "reference"  # 'auto': Triton on CUDA only
    finally:
        dist.destroy_process_group()


def test_fsdp2_step_in_backward_equals_the_normal_step(tmp_path):
    """FSDP2 calls the step-in-backward hooks per sharded parameter: with per-layer clipping the weights after 6
    steps on 2 ranks equal the normal FSDP2 step's (with the same clipping) bit for bit, and every step reports a
    finite global gradient norm."""
    torchrun(2, "dist_fsdp_worker.py", "inbackward", str(tmp_path), logs=tmp_path)
    result = json.loads((tmp_path / "inbackward-w2.json").read_text())
    assert result["max_diff"] == 0.0, result
    assert len(result["norms"]) == 6 and all(0 < n < float("inf") for n in result["norms"]), result
