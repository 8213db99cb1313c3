"""Compile the GDN and frozen-attention kernels for Hopper (sm_90) without a GPU: catches compiled-mode errors
the interpreter misses, and shared memory beyond what an H100 block may use.

Run as a script with TRITON_INTERPRET=0 (tests/test_kernels_compile.py does); `--jobs FILE` compiles the
launches recorded by tests/launch_recorder.py instead of the fixed list below. Prints one line per kernel; exit 3
when this Triton cannot compile for CUDA here (no CUDA backend or ptxas).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")

import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print(f"cannot compile ahead of time with triton {triton.__version__}: {err}")
    sys.exit(3)

import torch  # noqa: E402
from apollo_fast.kernels import frozen_attention, gdn_chunk, gdn_gate, gdn_recurrent  # noqa: E402

from apollo_fast.gdn.delta_rule import CHUNK_SIZE  # noqa: E402

P = lambda dt: "*" + dt
C = "constexpr"


MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KiB)


def compile_one(fn, signature, constexprs, num_warps=4, num_stages=3, **options) -> None:
    fn = getattr(fn, "_kernel", fn)  # a launch_recorder proxy
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages, **options)
    )
    shared = kernel.metadata.shared
    if shared > MAX_SHARED:
        raise ValueError(f"{fn.__name__} {constexprs}: {shared} bytes of shared memory > {MAX_SHARED}")
    print(f"{fn.__name__} {constexprs} compiled for sm_90; shared memory {shared} B")


def compile_frozen_attention() -> None:
    """Forward, dq and dk/dv kernels at Qwen3.5's attention head size (256) in bf16 and fp32, and 128 in bf16."""
    fa = frozen_attention
    strides = lambda names: {f"stride_{a}{b}": "i64" for a in names for b in "bht"}
    for D, dt in ((256, "bf16"), (128, "bf16"), (256, "fp32")):
        cfg = fa._config(D, torch.bfloat16 if dt == "bf16" else torch.float32)
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        blocks = {n: C for n in cfg}
        ctx_args = dict(T="i32", Lc="i32", scale="fp32", HKV=C, G=C, D=C, HAS_CTX=C, **blocks)
        consts = dict(cfg, HKV=2, G=4, D=D, HAS_CTX=True)
        compile_one(
            fa._frozen_attention_fwd_kernel,
            dict(
                Q=P(dt),
                K=P(dt),
                V=P(dt),
                CK=P(dt),
                CV=P(dt),
                O=P(dt),
                LSE=P("fp32"),
                **strides(("q", "k", "v", "ck", "cv")),
                **ctx_args,
            ),
            consts,
            **opts,
        )
        compile_one(
            fa._frozen_attention_bwd_dq_kernel,
            dict(
                Q=P(dt),
                K=P(dt),
                V=P(dt),
                CK=P(dt),
                CV=P(dt),
                DO=P(dt),
                LSE=P("fp32"),
                DELTA=P("fp32"),
                DQ=P(dt),
                **strides(("q", "k", "v", "ck", "cv")),
                **ctx_args,
            ),
            consts,
            **opts,
        )
        compile_one(
            fa._frozen_attention_bwd_dkdv_kernel,
            dict(
                Q=P(dt),
                K=P(dt),
                V=P(dt),
                DO=P(dt),
                LSE=P("fp32"),
                DELTA=P("fp32"),
                DK=P(dt),
                DV=P(dt),
                **strides(("q", "k", "v")),
                T="i32",
                scale="fp32",
                HKV=C,
                G=C,
                D=C,
                **blocks,
            ),
            dict(cfg, HKV=2, G=4, D=D),
            **opts,
        )


def compile_jobs(path: str) -> None:
    """Compile the launches recorded by launch_recorder (a JSON list of kernel/signature/constexprs/options)."""
    import importlib
    import json

    import triton.language as tl

    for job in json.loads(open(path).read()):
        module, name = job["kernel"].rsplit(".", 1)
        fn = getattr(importlib.import_module(module), name)
        constexprs = {
            k: (tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v)
            for k, v in job["constexprs"].items()
        }
        compile_one(fn, job["signature"], constexprs, **job["options"])


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--jobs":
        try:
            compile_jobs(sys.argv[2])
        except (RuntimeError, FileNotFoundError) as err:
            if "ptxas" in str(err) or "backend" in str(err).lower():
                print(f"cannot compile for CUDA here: {err}")
                return 3
            raise
        return 0
    shapes = dict(HK=16, HV=48, K=128, V=128, BK=128, BV=32)
    fwd = dict(
        q=P("bf16"),
        k=P("bf16"),
        v=P("bf16"),
        g=P("fp32"),
        beta=P("bf16"),
        h0=P("fp32"),
        o=P("bf16"),
        ht=P("fp32"),
        ckpt=P("fp32"),
        cu_seqlens=P("i32"),
        T="i32",
        scale="fp32",
        eps="fp32",
        ckpt_every="i32",
        n_ckpt="i32",
        h0_stride="i32",
        **{n: C for n in shapes},
        USE_H0=C,
        STORE_HT=C,
        SAVE_CKPT=C,
        VARLEN=C,
        L2NORM=C,
    )
    bwd = dict(
        q=P("bf16"),
        k=P("bf16"),
        v=P("bf16"),
        g=P("fp32"),
        beta=P("bf16"),
        ckpt=P("fp32"),
        do=P("bf16"),
        dht=P("fp32"),
        scratch=P("fp32"),
        dq_part=P("fp32"),
        dk_part=P("fp32"),
        dv=P("bf16"),
        dg_part=P("fp32"),
        dbeta_part=P("fp32"),
        cu_seqlens=P("i64"),
        T="i32",
        NT="i32",
        scale="fp32",
        eps="fp32",
        ckpt_every="i32",
        n_ckpt="i32",
        **{n: C for n in shapes},
        USE_DHT=C,
        VARLEN=C,
        L2NORM=C,
    )
    gate_fwd = dict(
        a=P("bf16"),
        b=P("bf16"),
        A_log=P("bf16"),
        dt_bias=P("fp32"),
        g=P("fp32"),
        beta=P("bf16"),
        R="i32",
        T="i32",
        **{f"s{x}_{y}": "i32" for x in "ab" for y in "bth"},
        HV=C,
        BLOCK_R=C,
        BLOCK_H=C,
    )
    gate_bwd = dict(
        a=P("bf16"),
        b=P("bf16"),
        A_log=P("bf16"),
        dt_bias=P("fp32"),
        dg=P("fp32"),
        dbeta=P("bf16"),
        da=P("bf16"),
        db=P("bf16"),
        dA_part=P("fp32"),
        dbias_part=P("fp32"),
        R="i32",
        T="i32",
        rows_per_prog="i32",
        **{f"s{x}_{y}": "i32" for x in "abgd" for y in "bth"},
        HV=C,
        BLOCK_R=C,
        BLOCK_H=C,
    )
    chunk_shapes = dict(HK=16, HV=48, K=128, V=128, BT=CHUNK_SIZE, BK=128, BV=32)
    chunk_fwd = {n: t for n, t in fwd.items() if n not in ("ckpt_every", *shapes)}
    chunk_fwd.update(Tb=P("fp32"), Wb=P("fp32"), **{n: C for n in chunk_shapes}, DOT_PREC=C, PREPARED=C)
    flags = dict(VARLEN=C, L2NORM=C, DOT_PREC=C)
    prep = dict(
        k=P("bf16"),
        g=P("fp32"),
        beta=P("bf16"),
        Tb=P("fp32"),
        Wb=P("fp32"),
        cu_seqlens=P("i32"),
        T="i32",
        eps="fp32",
        n_ckpt="i32",
        HK=C,
        HV=C,
        K=C,
        BT=C,
        BK=C,
        **flags,
    )
    dh = dict(
        q=P("bf16"),
        k=P("bf16"),
        g=P("fp32"),
        do=P("bf16"),
        dht=P("fp32"),
        Wb=P("fp32"),
        dh=P("fp32"),
        cu_seqlens=P("i32"),
        T="i32",
        scale="fp32",
        eps="fp32",
        n_ckpt="i32",
        **{n: C for n in chunk_shapes},
        USE_DHT=C,
        **flags,
    )
    chunk_bwd = dict(
        q=P("fp32"),
        k=P("fp32"),
        v=P("fp32"),
        g=P("fp32"),
        beta=P("fp32"),
        ckpt=P("fp32"),
        dh=P("fp32"),
        Tb=P("fp32"),
        Wb=P("fp32"),
        do=P("fp32"),
        dq_out=P("fp32"),
        dk_out=P("fp32"),
        dv=P("fp32"),
        dg_out=P("fp32"),
        dbeta_out=P("fp32"),
        cu_seqlens=P("i64"),
        T="i32",
        scale="fp32",
        eps="fp32",
        n_ckpt="i32",
        **{n: C for n in chunk_shapes},
        **flags,
    )
    no_v = {n: v for n, v in chunk_shapes.items() if n not in ("V", "BV")}
    NW = dict(num_warps=gdn_chunk.NUM_WARPS, num_stages=gdn_chunk.NUM_STAGES, maxnreg=gdn_chunk.MAX_REGISTERS)
    try:
        # the chunked kernels: both forward variants and the three backward kernels; tf32x3 (fp32) and tf32 (bf16)
        compile_one(
            gdn_chunk._chunk_delta_rule_fwd_kernel,
            chunk_fwd,
            dict(
                chunk_shapes,
                USE_H0=True,
                STORE_HT=True,
                SAVE_CKPT=True,
                VARLEN=True,
                L2NORM=True,
                DOT_PREC="tf32x3",
                PREPARED=True,
            ),
            **NW,
        )
        compile_one(
            gdn_chunk._chunk_delta_rule_fwd_kernel,
            chunk_fwd,
            dict(
                chunk_shapes,
                USE_H0=True,
                STORE_HT=True,
                SAVE_CKPT=False,
                VARLEN=False,
                L2NORM=True,
                DOT_PREC="tf32",
                PREPARED=False,
            ),
            **NW,
        )
        compile_one(
            gdn_chunk._chunk_prepare_kernel, prep, dict(no_v, VARLEN=True, L2NORM=True, DOT_PREC="tf32x3"), **NW
        )
        compile_one(
            gdn_chunk._chunk_bwd_dh_kernel,
            dh,
            dict(chunk_shapes, USE_DHT=True, VARLEN=True, L2NORM=True, DOT_PREC="tf32x3"),
            **NW,
        )
        bwd_shapes = dict(chunk_shapes, BV=gdn_chunk.BWD_BLOCK_V)
        compile_one(
            gdn_chunk._chunk_bwd_kernel, chunk_bwd, dict(bwd_shapes, VARLEN=False, L2NORM=True, DOT_PREC="tf32x3"), **NW
        )
        bf16 = {n: (P("bf16") if n in ("q", "k", "v", "beta", "do", "dv") else t) for n, t in chunk_bwd.items()}
        compile_one(
            gdn_chunk._chunk_bwd_kernel, bf16, dict(bwd_shapes, VARLEN=True, L2NORM=True, DOT_PREC="tf32"), **NW
        )
        compile_one(
            gdn_recurrent._segment_delta_rule_fwd_kernel,
            fwd,
            dict(shapes, USE_H0=True, STORE_HT=True, SAVE_CKPT=True, VARLEN=True, L2NORM=True),
        )
        compile_one(
            gdn_recurrent._segment_delta_rule_fwd_kernel,
            fwd,
            dict(shapes, USE_H0=False, STORE_HT=False, SAVE_CKPT=False, VARLEN=False, L2NORM=False),
        )
        compile_one(
            gdn_recurrent._segment_delta_rule_bwd_kernel, bwd, dict(shapes, USE_DHT=True, VARLEN=True, L2NORM=True)
        )
        compile_one(
            gdn_recurrent._segment_delta_rule_bwd_kernel, bwd, dict(shapes, USE_DHT=False, VARLEN=False, L2NORM=False)
        )
        gates = dict(HV=48, BLOCK_R=gdn_gate.BLOCK_R, BLOCK_H=64)
        compile_one(gdn_gate._gdn_gate_fwd_kernel, gate_fwd, gates)
        compile_one(gdn_gate._gdn_gate_bwd_kernel, gate_bwd, gates)
        compile_frozen_attention()
    except (RuntimeError, FileNotFoundError) as err:  # no CUDA backend / ptxas in this environment
        if "ptxas" in str(err) or "backend" in str(err).lower():
            print(f"cannot compile for CUDA here: {err}")
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
