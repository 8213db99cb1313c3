"""Every Triton kernel compiles for Hopper (sm_90) on a machine without a GPU (CPU CI).

The interpreter accepts some code the compiler rejects; this compiles each kernel in a subprocess
with TRITON_INTERPRET=0 (the flag is read when kernels are defined), and fails on more shared memory
than an H100 block may use. GDN and frozen attention: a fixed list at the models' sizes. APOLLO: every
launch that optimizer steps at rank 256 (both orientations, fp32/bf16, capturable or not, both scale
types, bf16 moments, stochastic rounding of odd-width AdamW matrices, and sharded (DTensor) matrices along
either side on a one-process gloo group) really make, recorded under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = Path(__file__).with_name("aot_compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"this Triton cannot compile for CUDA here: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, f"compile failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("compiled for sm_90") == 21, proc.stdout


def _run_compile(*args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = Path(__file__).with_name("aot_compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"this Triton cannot compile for CUDA here: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, f"compile failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_apollo_kernels_compile_for_sm90(tmp_path):
    import json

    import torch.distributed as dist
    from apollo_fast.kernels import apollo_adamw, apollo_philox, apollo_project, apollo_update
    from launch_recorder import record, unique
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from apollo_fast import APOLLO

    configs = [
        dict(dtype=torch.float32, capturable=False, scale_type="channel", state_dtype=torch.float32),
        dict(dtype=torch.bfloat16, capturable=True, scale_type="tensor", state_dtype=torch.bfloat16),
        dict(
            dtype=torch.bfloat16,
            capturable=False,
            scale_type="channel",
            state_dtype=torch.float32,
            param_rounding="stochastic",
            weight_decay=0.1,
        ),
    ]  # compensated (bf16 default): above
    sharded = [  # channel-side and compressed-side shards: FSDP2's usual bf16 compensated; stochastic, capturable
        dict(dtype=torch.bfloat16, capturable=False, scale_type="channel", state_dtype=torch.float32, sharded=True),
        dict(
            dtype=torch.bfloat16,
            capturable=True,
            scale_type="tensor",
            state_dtype=torch.bfloat16,
            sharded=True,
            param_rounding="stochastic",
        ),
    ]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        with record([apollo_philox, apollo_project, apollo_update, apollo_adamw]) as jobs:
            for cfg in configs + sharded:
                dtype, state_dtype, shard = cfg.pop("dtype"), cfg.pop("state_dtype"), cfg.pop("sharded", False)
                mats = [torch.randn(300, 260, dtype=dtype), torch.randn(260, 300, dtype=dtype)]  # tall, wide
                others = [torch.randn(7), torch.randn(7, 5, dtype=dtype)]  # AdamW: fp32, and 16-bit of odd width
                if shard:  # both matrices along each side: Shard(0) and Shard(1)
                    mats = [distribute_tensor(w, mesh, [Shard(d)]) for w in mats for d in (0, 1)]
                    others = [distribute_tensor(w, mesh, [Shard(0)]) for w in others]
                params = [torch.nn.Parameter(w) for w in mats + others]
                groups = [{"params": params[: len(mats)]}, {"params": params[len(mats) :], "apollo": False}]
                opt = APOLLO(
                    groups,
                    lr=1e-3,
                    rank=256,
                    backend="triton",
                    state_dtype=state_dtype,
                    nonfinite="skip" if cfg["capturable"] else "raise",
                    **cfg,
                )
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
    finally:
        dist.destroy_process_group()
    jobs = unique(jobs)
    assert {j["kernel"].rsplit(".", 1)[1] for j in jobs} >= {
        "_philox_projection_fwd_kernel",
        "_apollo_project_fwd_kernel",
        "_apollo_moments_fwd_kernel",
        "_apollo_scale_fwd_kernel",
        "_apollo_update_fwd_kernel",
        "_adamw_fwd_kernel",
    }
    variants = {(j["kernel"].rsplit(".", 1)[1], k, v) for j in jobs for k, v in j["constexprs"].items()}
    for want in [
        ("_philox_projection_fwd_kernel", "SPREAD", True),
        ("_apollo_project_fwd_kernel", "SPREAD", True),
        ("_apollo_moments_fwd_kernel", "SPREAD", True),
        ("_apollo_scale_fwd_kernel", "MODE", 1),
        ("_apollo_scale_fwd_kernel", "MODE", 2),
        ("_apollo_update_fwd_kernel", "SHARD", 1),
        ("_apollo_update_fwd_kernel", "SHARD", 2),
        ("_adamw_fwd_kernel", "QUADS", False),
    ]:
        assert want in variants, f"no launch recorded for {want}"
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    out = _run_compile("--jobs", str(path))
    assert out.count("compiled for sm_90") == len(jobs), out
