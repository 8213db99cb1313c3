"""`apollo-fast train --fsdp` under torchrun: 2 and 3 CPU ranks (gloo), checked against one process.

One run (a tiny Qwen3.5: 3 GDN layers + 1 attention layer; behaviour examples of 3 segments in micro-batches of
2 mixed with general text at 1/3 of the trained tokens; 4 items per step, so 3 ranks get 2, 1 and 1 items and
run zero-weight passes) is trained on one process, on 2 and on 3 ranks, killed and resumed, and resumed across
world sizes and checkpoint layouts. The torchrun jobs are shared by the tests below (a module fixture): each
starts in 10-20 s on two cores, so their number is kept to three.

Agreement "to fp32 rounding": per parameter, ||W - W_one_process|| <= 1e-5 ||W_one_process - W_0|| + 4 ulp
||W_one_process|| (2**-21 ||W||). The ulp term matters for the few weights that move by 1e-3 of their size in
these 4 steps (GDN's A_log and dt_bias): one rounding of such a weight is already 3e-5 of its change, and one
process summing the same gradients in another order (another --segment-batch) differs from itself by as much.
Measured: every parameter within 0.3 of that bound; a resume on the same world size bit for bit.

Each torchrun job has a hard timeout; on expiry torchrun and its ranks (which torchrun puts in their own
sessions) are killed by PID.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from dist_train_worker import truncated_copy
from torchrun_job import HERE, TIMEOUT_S, Job
from train_fixtures import copy_behaviour, general_texts, make_model_dir, one_thread, write_jsonl

from apollo_fast.training.checkpoint import CHECKPOINT_DIR, CheckpointError, verify_checkpoint

PAUSE = 0.6  # seconds at each commit point of the killed job: the window in which the test kills a rank


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


RUN = dict(general_fraction="1/3", mix_by="tokens", steps=4, grad_accum=4, segment_batch=2, lr=5e-3, rank=4,
           update_proj_gap=2, weight_decay=0.1, checkpoint_every=2, seed=5, progress=False)  # fmt: skip


def run_jobs(nproc: int, jobs: list[dict], root: Path, name: str) -> None:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    code, out = Job(nproc, HERE / "dist_train_worker.py", spec, logs=root / f"{name}.log").finish()
    assert code == 0, f"{name} on {nproc} ranks failed:\n{out[-6000:]}"


def cli_args(config: dict) -> list[str]:
    args = ["train"]
    for key, value in config.items():
        if key == "progress":
            args += [] if value else ["--no-progress"]
        elif value is True:
            args.append(f"--{key.replace('_', '-')}")
        elif value is not False and value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# -- the runs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apollo_fast.training.loop import TrainConfig, train
    from apollo_fast.training.run_lock import RunFolderBusy, RunLock

    root = tmp_path_factory.mktemp("fsdp")
    model = make_model_dir(root, "qwen3_5", seed=0)
    data = write_jsonl(root / "b.jsonl", copy_behaviour(8, seed=3, segments=3))
    general = write_jsonl(root / "g.jsonl", general_texts(6))
    inputs = dict(model=str(model), data=str(data), general=str(general))

    def config(out: str, **extra) -> dict:
        return {**inputs, **RUN, "out": str(root / out), **extra}

    times = {}
    t = time.monotonic()
    train(TrainConfig(**config("single")))
    times["one process"] = time.monotonic() - t

    train(TrainConfig(**config("single-bf16", dtype="bfloat16")))

    t = time.monotonic()
    s2f = truncated_copy(root / "single", root / "s2f", 2)
    bf16 = config("w2-bf16", dtype="bfloat16")
    run_jobs(2, [{"config": config("w2"), "gathered": str(root / "w2.pt")},
                 {"config": config(s2f.name, resume="latest")},
                 {"config": bf16},
                 {"config": {**bf16, "out": str(root / "w2-bf16-resumed"), "resume": "latest"},
                  "copy": [bf16["out"], str(root / "w2-bf16-resumed"), 2]},
                 {"config": {**config("bad"), "data": str(root / "missing.jsonl")},
                  "errors": str(root / "bad-errors.json")}], root, "launch-2")  # fmt: skip
    times["2 ranks: a run, a resume of a one-process checkpoint, a bf16 run and its resume"] = time.monotonic() - t

    # 3 ranks, killed (SIGKILL to rank 1) while the last checkpoint's shards are written, not yet renamed
    t = time.monotonic()
    killed = config("k3", gradient_checkpointing=True)
    job = Job(3, "-m", "apollo_fast", *cli_args(killed), "--fsdp", logs=root / "killed.log", pause=PAUSE)
    out, busy, victim = Path(killed["out"]), None, None
    deadline = time.monotonic() + TIMEOUT_S
    while victim is None and time.monotonic() < deadline and job.proc.poll() is None:
        if busy is None and (out / "run.json").exists():  # the job holds its folder: another run is refused
            try:
                RunLock(out).release()
            except RunFolderBusy as err:
                busy = (str(err), job.rank_pid(0))
        if list((out / CHECKPOINT_DIR).glob(".tmp-step-00000004-*/.metadata")):
            victim = job.rank_pid(1)
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    code, killed_log = job.finish()
    assert victim is not None, f"the job ended (exit {code}) before the kill:\n{killed_log[-4000:]}"
    after_kill = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())
    times["3 ranks, killed"] = time.monotonic() - t

    t = time.monotonic()
    r23 = truncated_copy(root / "w2", root / "r23", 2)
    damaged = truncated_copy(root / "w2", root / "damaged", 4)
    shard = damaged / CHECKPOINT_DIR / "step-00000004" / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1  # one flipped bit in rank 1's shards: DCP itself would load it
    shard.write_bytes(bytes(raw))
    run_jobs(3, [{"config": config("w3", gradient_checkpointing=True)},
                 {"config": {**killed, "resume": "latest"}},
                 {"config": config(r23.name, resume="latest")},
                 {"config": config(damaged.name, resume="latest")}], root, "launch-3")  # fmt: skip
    times["3 ranks: a run, the killed job resumed, a 2-rank checkpoint resumed"] = time.monotonic() - t

    t = time.monotonic()
    f2s = truncated_copy(root / "w2", root / "f2s", 2)
    train(TrainConfig(**config(f2s.name, resume="latest")))
    times["one process resumes a 2-rank checkpoint"] = time.monotonic() - t
    print("\n".join(f"{what}: {s:.1f} s" for what, s in times.items()))
    return {"root": root, "model": model, "killed": (code, killed_log, after_kill, victim), "busy": busy}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


def losses(folder: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((folder / "loss.csv").open())]


def assert_close_to_one_process(runs, name: str) -> float:
    """Every parameter of run `name` agrees with the one-process run to fp32 rounding; the worst ratio to the
    bound (module doc). The per-step losses agree to 1e-5."""
    from safetensors.torch import load_file

    init = load_file(runs["model"] / "model.safetensors")
    want, got = weights(runs["root"] / "single"), weights(runs["root"] / name)
    assert got.keys() == want.keys()
    worst = 0.0
    for k, w in want.items():
        w, g, w0 = w.double(), got[k].double(), init[k].double()
        bound = 1e-5 * (w - w0).norm() + 2**-21 * w.norm()
        worst = max(worst, float((g - w).norm() / bound))
    assert worst <= 1.0, f"{name}: a parameter is {worst:.2f}x the fp32-rounding bound away from one process"
    a, b = losses(runs["root"] / "single"), losses(runs["root"] / name)
    assert len(a) == len(b) == RUN["steps"] and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b, strict=True))
    return worst


def test_sharded_runs_equal_the_one_process_run(runs):
    """2 ranks (2 items each) and 3 ranks (2, 1, 1 items: zero-weight passes; with gradient checkpointing of
    the frozen segments) end on the one-process weights and losses."""
    for name in ("w2", "w3"):
        assert_close_to_one_process(runs, name)


def test_bf16_weights_agree_to_bf16_rounding_and_resume_bit_for_bit(runs):
    """bf16 weights (APOLLO's compensated rounding: its int16 residuals are sharded and checkpointed too): 2 ranks
    stay within 5% of the one-process weight change (one process with another --segment-batch differs by 2.5%:
    bf16 gradients summed in another order), the losses within 1e-3; a resume from the step-2 DCP checkpoint
    ends on the same weights bit for bit."""
    from safetensors.torch import load_file

    root = runs["root"]
    init = load_file(runs["model"] / "model.safetensors")
    one, two = weights(root / "single-bf16"), weights(root / "w2-bf16")
    assert all(v.dtype == torch.bfloat16 for v in two.values())
    off = sum(float((two[k].double() - one[k].double()).square().sum()) for k in one) ** 0.5
    change = sum(float((one[k].double() - init[k].double()).square().sum()) for k in one) ** 0.5
    assert off <= 0.05 * change, f"2 ranks are {off / change:.3f} of the weight change away from one process"
    a, b = losses(root / "single-bf16"), losses(root / "w2-bf16")
    assert all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(a, b, strict=True))
    resumed = weights(root / "w2-bf16-resumed")
    assert all(torch.equal(two[k], resumed[k]) for k in two), "the bf16 resume left the trajectory"


def test_resume_on_another_world_size_and_across_checkpoint_layouts(runs):
    """A 2-rank DCP checkpoint continues on 3 ranks and on one process; a one-process checkpoint continues on
    2 ranks; all on the uninterrupted trajectory."""
    for name in ("r23", "f2s", "s2f", "damaged"):
        assert_close_to_one_process(runs, name)
    manifest = json.loads((runs["root"] / "w2" / CHECKPOINT_DIR / "step-00000004" / "manifest.json").read_text())
    assert manifest["layout"] == "dcp" and manifest["world_size"] == 2
    assert {".metadata", "trainer.pt", "__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])


def test_a_damaged_sharded_checkpoint_is_detected_and_passed_over(runs):
    """A bit flipped in one rank's shard file of the newest checkpoint: its manifest check fails (the ranks
    share the checksumming and agree), --resume moves it to corrupt-step-* and continues from the one before,
    on the uninterrupted trajectory (checked above with the other resumes)."""
    checkpoints = runs["root"] / "damaged" / CHECKPOINT_DIR
    assert (checkpoints / "corrupt-step-00000004").is_dir()
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: sha256 differs from the manifest"):
        verify_checkpoint(checkpoints / "corrupt-step-00000004")
    verify_checkpoint(checkpoints / "step-00000004")  # written again by the resumed run


def test_bad_input_is_reported_once(runs):
    """A missing --data under torchrun: rank 0 raises the error (the CLI prints it, exit 2), the other ranks
    raise ReportedElsewhere (the CLI exits 2 quietly); nothing is created."""
    errors = json.loads((runs["root"] / "bad-errors.json").read_text())
    assert errors[0][0] == "FileNotFoundError" and "missing.jsonl" in errors[0][1]
    assert errors[1][0] == "ReportedElsewhere" and errors[1][1].startswith("rank 0 failed: FileNotFoundError")
    assert not (runs["root"] / "bad").exists()


def test_a_killed_rank_ends_the_job_and_leaves_no_half_written_checkpoint(runs):
    """SIGKILL to rank 1 while the last checkpoint is being written: torchrun ends the job naming rank 1 and the
    signal; no step-00000004 exists (its folder never got its name); step-00000002 verifies; the resumed job
    ends on the uninterrupted 3-rank run's weights and losses bit for bit, with nothing temporary left."""
    code, log, after_kill, victim = runs["killed"]
    assert code != 0
    assert "Signal 9 (SIGKILL)" in log and re.search(r"Root Cause.*?rank\s*:\s*1 ", log, re.S), log[-3000:]
    assert f"pid: {victim}" in log
    assert "step-00000004" not in after_kill and "step-00000002" in after_kill
    assert all(n == "step-00000002" or n.startswith(".tmp-") for n in after_kill), after_kill
    root = runs["root"]
    verify_checkpoint(root / "k3" / CHECKPOINT_DIR / "step-00000002")
    want, got = weights(root / "w3"), weights(root / "k3")
    assert all(torch.equal(want[k], got[k]) for k in want), "the resumed job left the uninterrupted trajectory"
    assert losses(root / "w3") == losses(root / "k3")
    for folder in (root / "k3", root / "k3" / CHECKPOINT_DIR):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_rank_zero_holds_the_lock_and_writes_the_run_folder(runs):
    """While the job runs, its folder's lock is held by rank 0 (another run is refused, naming rank 0's PID);
    the folder holds exactly one run's files; the model folder loads with from_pretrained and equals the weights
    gathered from the shards."""
    from transformers import AutoModelForCausalLM

    message, rank0 = runs["busy"]
    assert f"in use by another apollo-fast train run (PID {rank0})" in message
    w2 = runs["root"] / "w2"
    assert sorted(p.name for p in w2.iterdir()) == [".lock", "checkpoints", "loss.csv", "loss.png", "model", "run.json"]
    assert sorted(p.name for p in (w2 / CHECKPOINT_DIR).iterdir()) == ["step-00000002", "step-00000004"]
    record = json.loads((w2 / "run.json").read_text())
    assert record["world_size"] == 2 and record["fsdp"] is True
    gathered = torch.load(runs["root"] / "w2.pt", weights_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(w2 / "model").state_dict()
    assert gathered.keys() == loaded.keys()
    for k, v in gathered.items():
        assert torch.equal(v, loaded[k]), f"{k}: the saved model differs from the gathered weights"


def test_rounds_give_every_rank_the_same_passes():
    """Item i goes to rank i mod W; a round encodes when any of its items has a context and runs the most
    passes any of its items needs; a rank without an item takes part all the same."""
    from apollo_fast.training.fsdp import Round, rounds

    plan = rounds([True, False, True, False], [2, 1, 1, 1], world=3)
    assert plan == [Round((0, 1, 2), True, 2), Round((3, None, None), False, 1)]
    assert rounds([False, False], [1, 1], world=3) == [Round((0, 1, None), False, 1)]


def test_fsdp_options_and_launch_errors(tmp_path, monkeypatch, capsys):
    """Exit 2 with one message: --fsdp outside torchrun; several torchrun processes without --fsdp; --fsdp with
    options it does not support (checked on a one-process gloo group)."""
    import torch.distributed as dist

    from apollo_fast.cli import main
    from apollo_fast.training.loop import TrainConfig, train

    base = ["train", "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o"]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main([*map(str, base), "--fsdp"]) == 2
    assert "--fsdp runs under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(list(map(str, base))) == 2
    assert "running under torchrun with 2 processes: pass --fsdp" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for extra, option in ((dict(step_in_backward=True, max_grad_norm=None), "--step-in-backward"),
                              (dict(serve_vllm="http://127.0.0.1:1"), "--serve-vllm")):  # fmt: skip
            with pytest.raises(ValueError, match=f"--fsdp does not support {option}"):
                train(TrainConfig(model=str(tmp_path), data="d", out=str(tmp_path / "o"), fsdp=True, **extra))
        with pytest.raises(ValueError, match="--device must be 'cpu' or 'cuda'"):
            train(TrainConfig(model=str(tmp_path), data="d", out=str(tmp_path / "o"), fsdp=True, device="cuda:1"))
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_nccl_equal_one_gpu(tmp_path):
    """The same run on 2 GPUs (NCCL) ends on the one-GPU weights to fp32 rounding."""
    from safetensors.torch import load_file

    from apollo_fast.training.loop import TrainConfig, train

    model = make_model_dir(tmp_path, "qwen3_5", seed=0)
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(8, seed=3, segments=3))
    general = write_jsonl(tmp_path / "g.jsonl", general_texts(6))
    common = {**RUN, "model": str(model), "data": str(data), "general": str(general), "device": "cuda"}
    train(TrainConfig(**common, out=str(tmp_path / "one")))
    args = cli_args({**common, "out": str(tmp_path / "two")})
    code, out = Job(2, "-m", "apollo_fast", *args, "--fsdp", logs=tmp_path / "gpu.log").finish()
    assert code == 0, out[-4000:]
    init = load_file(model / "model.safetensors")
    want, got = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    for k, w in want.items():
        w, g, w0 = w.double(), got[k].double(), init[k].double()
        assert (g - w).norm() <= 1e-5 * (w - w0).norm() + 2**-21 * w.norm(), k
