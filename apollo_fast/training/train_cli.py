"""`apollo-fast train`: frozen-context behavioural fine-tuning with APOLLO, from JSONL files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..checks import number_arg
from ..reference.rounding import PARAM_ROUNDINGS
from .loop import DTYPES, LR_SCHEDULES, TrainConfig
from .mixing import MIX_BY

__all__ = ["register", "config_from_args"]

_EPILOG = """\
data (JSONL, one object per line; blank lines skipped):
  --data     {"context": str, "segments": [{"prompt": str, "target": str}, ...]}
             the context is encoded once without gradients; loss on the target tokens only
  --general  {"text": str} (plain language modelling, cut into --general-chunk-tokens chunks)
             or the --data schema
output (in --out): model/ (from_pretrained-ready), checkpoints/step-*/, loss.png, loss.csv, run.json
several GPUs / nodes: torchrun --nproc-per-node N [--nnodes M ...] -m apollo_fast train ... --fsdp
"""


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        general=args.general,
        general_fraction=args.general_fraction,
        mix_by=args.mix_by,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        rank=args.rank,
        mini=args.mini,
        alpha=args.alpha,
        update_proj_gap=args.update_proj_gap,
        weight_decay=args.weight_decay,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None,
        seed=args.seed,
        max_context_tokens=args.max_context_tokens,
        max_segment_tokens=args.max_segment_tokens,
        general_chunk_tokens=args.general_chunk_tokens,
        target_eos=args.target_eos,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        dtype=args.dtype,
        param_rounding=args.param_rounding,
        step_in_backward=args.step_in_backward,
        serve_vllm=args.serve_vllm,
        push_every=args.push_every,
        serve_port=args.serve_port,
        serve_vllm_args=args.serve_vllm_args,
        push_verify=args.push_verify,
        clip_per=args.clip_per,
        skip_nonfinite=args.skip_nonfinite,
        segment_batch=args.segment_batch,
        gradient_checkpointing=args.gradient_checkpointing,
        progress=not args.no_progress,
        fsdp=args.fsdp,
    )


def _main(args: argparse.Namespace) -> int:
    from .fsdp import LostRank, ReportedElsewhere
    from .loop import train

    cfg = config_from_args(args)
    reporter = not cfg.fsdp or os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 speaks for the job
    try:
        result = train(cfg)
    except ReportedElsewhere:
        return 2
    except KeyboardInterrupt:
        if not reporter:
            return 130
        print(f"\napollo-fast train: interrupted; {_where(cfg)}", file=sys.stderr)
        return 130
    except LostRank as err:  # a collective failed: another rank died (torchrun's report names it)
        rank = os.environ.get("RANK", "?")
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"apollo-fast train: error: rank {rank} lost the job: another rank failed or was killed (torchrun's "
              f"report names it): {cause}; {_where(cfg)}", file=sys.stderr)  # fmt: skip
        return 1
    if not reporter:
        return 0
    final = result.history["loss"][-1] if result.history["loss"] else float("nan")
    print(f"trained {result.steps} steps (final step loss {final:.4f})")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with non-finite gradients")
    print(f"model:      {result.model_dir}")
    print(f"loss plot:  {result.plot}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _where(cfg: TrainConfig) -> str:
    from .checkpoint import CHECKPOINT_DIR, latest_checkpoint

    latest = latest_checkpoint(Path(cfg.out) / CHECKPOINT_DIR)
    return f"the latest checkpoint is {latest}; continue with --resume" if latest else "no checkpoint was written"


def register(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig
    p = sub.add_parser(
        "train",
        help="fine-tune a local model on behaviour JSONL with frozen contexts and APOLLO",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", required=True, metavar="DIR", help="local transformers model folder with its tokenizer")
    io.add_argument("--data", required=True, metavar="FILE", help="behaviour examples (JSONL)")
    io.add_argument("--out", required=True, metavar="DIR", help="output folder (model/, checkpoints/, loss.png)")
    io.add_argument("--general", metavar="FILE", help='general data mixed in (JSONL: {"text"} or the --data schema)')
    io.add_argument(
        "--general-fraction", metavar="F", help="exact share of general data, e.g. 0.25 or 1/3 (needs --general)"
    )
    io.add_argument("--mix-by", choices=MIX_BY, default=d.mix_by, help="the share counts items or trained tokens")
    io.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                    help="continue from a checkpoint (default: the newest under --out)")  # fmt: skip
    io.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")

    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: one epoch of --data)")
    length.add_argument("--epochs", type=number_arg(above=0), help="epochs over --data (general data is extra)")

    opt = p.add_argument_group("optimizer (APOLLO for matrices, AdamW for the rest)")
    opt.add_argument("--lr", type=number_arg(above=0), default=d.lr, help=f"peak learning rate (default {d.lr})")
    opt.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule)
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument("--rank", type=int, default=d.rank, help=f"APOLLO projection rank (default {d.rank})")
    opt.add_argument("--mini", action="store_true", help="APOLLO-Mini (rank 1, tensor-wise scaling)")
    opt.add_argument(
        "--alpha", type=number_arg(above=0), default=None, help="APOLLO update scale (default 1; Mini sqrt(128))"
    )
    opt.add_argument("--update-proj-gap", type=int, default=d.update_proj_gap, help="steps between projections")
    opt.add_argument("--weight-decay", type=number_arg(minimum=0), default=d.weight_decay)
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum, help="items per optimizer step")
    opt.add_argument(
        "--max-grad-norm", type=number_arg(minimum=0), default=d.max_grad_norm, help="clip (0: off; default 1.0)"
    )
    opt.add_argument("--skip-nonfinite", action="store_true", help="skip steps with inf/NaN gradients (default: stop)")
    opt.add_argument(
        "--step-in-backward",
        action="store_true",
        help="update each layer inside the backward and free its gradients (no full set of gradients in memory; "
        "needs --grad-accum 1 and --clip-per layer|param or --max-grad-norm 0)",
    )
    opt.add_argument(
        "--clip-per",
        choices=("model", "layer", "param"),
        default=d.clip_per,
        help="what --max-grad-norm bounds: the whole model's gradient (default), or each layer's / each "
        "parameter's (with --step-in-backward)",
    )
    opt.add_argument("--seed", type=int, default=d.seed, help="seeds the data order, projections and dropout")

    srv = p.add_argument_group("serving while training (vLLM)")
    srv.add_argument(
        "--serve-vllm",
        metavar="local|URL",
        help="push the weights into a vLLM engine as they train: 'local' starts vLLM's OpenAI-compatible server on "
        "--model at http://127.0.0.1:--serve-port/v1; a URL names a server started with our worker extension",
    )
    srv.add_argument("--push-every", type=int, default=d.push_every, help=f"steps between pushes ({d.push_every})")
    srv.add_argument("--serve-port", type=int, default=d.serve_port, help=f"port of 'local' ({d.serve_port})")
    srv.add_argument("--serve-vllm-args", default=d.serve_vllm_args, help="more `vllm serve` options for 'local'")
    srv.add_argument("--push-verify", action="store_true", help="check the engine's greedy tokens after each push")

    tok = p.add_argument_group("lengths (tokens)")
    tok.add_argument("--max-context-tokens", type=int, help="reject longer contexts (default: the model's limit)")
    tok.add_argument("--max-segment-tokens", type=int, help="reject longer segments (prompt + target)")
    tok.add_argument("--general-chunk-tokens", type=int, default=d.general_chunk_tokens)
    tok.add_argument("--target-eos", action="store_true", help="append the tokenizer's EOS to every target")

    run = p.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps (0: only at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    run.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype, help="load the model in this dtype")
    run.add_argument(
        "--param-rounding",
        choices=PARAM_ROUNDINGS,
        default=d.param_rounding,
        help=f"how updates are stored into bf16/fp16 weights (default {d.param_rounding}; fp32 weights ignore it)",
    )
    run.add_argument(
        "--segment-batch", type=int, default=d.segment_batch, help="segments per forward, right-padded (default 8)"
    )
    run.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the segments' layers in backward (less memory)"
    )
    run.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun (torchrun --nproc-per-node N -m apollo_fast train ... --fsdp): shard the model over "
        "the ranks with FSDP2, each rank trains its share of every step; checkpoints are DCP folders",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)
