"""`apollo-fast train` end to end on tiny local models: learning, outputs, mixing, interruption and resume.

The runs use the real frozen-context core; train_fixtures.fallback_segment_loss (full-sequence loss
with context labels -100) is an independent check of its loss values.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import assert_close
from train_fixtures import (
    IGNORE,
    backward_trainer,
    copy_behaviour,
    fallback_segment_loss,
    general_texts,
    make_model_dir,
    make_tokenizer,
    one_thread,
    use_fallback,
    write_jsonl,
)

from apollo_fast import cli
from apollo_fast.frozen.trainer import pad_segments
from apollo_fast.training import loop
from apollo_fast.training.checkpoint import STATE_FILE, latest_checkpoint
from apollo_fast.training.data import load_behaviour
from apollo_fast.training.loop import TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root, arch) for arch in ("llama", "qwen3_5")}


@pytest.fixture(scope="module")
def dropout_llama(tmp_path_factory):
    """A Llama with attention dropout: a resumed run only matches when the RNG state is restored."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dropout")
    path = make_model_dir(root, "llama", seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.attention_dropout = 0.1
    model.save_pretrained(path)
    return path


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def example_with_empty_prompt(tmp_path, tok):
    segs = [{"prompt": "", "target": "abc"}, {"prompt": " q:", "target": "xy"}, {"prompt": " r", "target": "long one"}]
    row = {"context": "hello world", "segments": segs}
    (ex,) = load_behaviour(write_jsonl(tmp_path / "one.jsonl", [row]), tok)
    return row, ex


@pytest.mark.parametrize("segment_batch", [1, 2, 8])
def test_item_loss_and_gradient_match_a_direct_full_sequence_loss(tmp_path, monkeypatch, segment_batch):
    """The data plumbing (labels, empty-prompt carry, padding, token weighting) against a hand-built loss."""
    from apollo_fast.toy import tiny_causal_lm

    use_fallback(monkeypatch)  # full-sequence gradients: comparable to the direct loss below
    tok = make_tokenizer()
    row, ex = example_with_empty_prompt(tmp_path, tok)
    model = tiny_causal_lm(seed=3)
    got = loop.item_backward(backward_trainer(model, segment_batch), ex, weight=0.5)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for seg in row["segments"]:
        prefix, target = enc(row["context"] + seg["prompt"]), enc(seg["target"])
        ids = torch.tensor([prefix + target])
        labels = torch.tensor([[IGNORE] * len(prefix) + target])
        total = total + model(input_ids=ids, labels=labels, use_cache=False).loss * len(target)
        count += len(target)
    want = total / count
    (want * 0.5).backward()
    assert_close("example loss", want.detach(), got, rtol=1e-6)
    for name, p in model.named_parameters():
        assert_close(f"grad {name}", p.grad, grads[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_real_frozen_path_gives_the_full_sequence_loss_value(tmp_path, arch):
    """encode_context + segment_loss through item_backward (the trainer's backward): the loss value equals the
    full-sequence one; padded batches of segments give the same loss and gradients as one segment at a time."""
    from apollo_fast.toy import tiny_causal_lm

    tok = make_tokenizer()
    _, ex = example_with_empty_prompt(tmp_path, tok)
    model = tiny_causal_lm(arch=arch, layers=4 if arch == "qwen3_5" else 2, seed=2)
    one_by_one = loop.item_backward(backward_trainer(model, 1), ex, weight=1.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = loop.item_backward(backward_trainer(model, 8), ex, weight=1.0)
    assert_close("batched vs one-by-one loss", one_by_one, got, rtol=1e-5)
    for name, g in grads.items():
        assert_close(f"batched vs one-by-one grad {name}", g, dict(model.named_parameters())[name].grad, 1e-4, 1e-7)
    q_grads = [p.grad for n, p in model.named_parameters() if "q_proj" in n]
    assert q_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in q_grads)
    with torch.no_grad():
        want = sum(
            fallback_segment_loss(model, ex.context_ids[None], s.input_ids[None], s.labels[None]) * s.n_target
            for s in ex.segments
        )
    assert_close("frozen example loss", want / ex.n_target, got, rtol=1e-5)


def test_train_llama_end_to_end(tmp_path, models, monkeypatch):
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(32, seed=0))
    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(models["llama"]), data=str(data), out=str(out), epochs=10, grad_accum=2, lr=1e-2, rank=8,
        lr_schedule="cosine", checkpoint_every=20, progress=False,
    )  # fmt: skip
    result = train(cfg)
    h = result.history
    assert result.steps == 160 and h["step"] == list(range(1, 161))  # 10 epochs x 32 examples / 2 per step
    first, last = sum(h["loss"][:10]) / 10, sum(h["loss"][-10:]) / 10
    assert last < 0.6 * first, f"loss did not go down enough: {first:.3f} -> {last:.3f}"

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert len(rows) == 160 and float(rows[-1]["loss"]) == pytest.approx(h["loss"][-1], rel=1e-5)
    assert json.loads((out / "run.json").read_text())["total_steps"] == 160
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000140", "step-00000160"]
    assert torch.load(latest_checkpoint(out / "checkpoints") / STATE_FILE, weights_only=True)["step"] == 160

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert any(p.suffix == ".safetensors" for p in (out / "model").iterdir())
    weights_equal(result.model.state_dict(), loaded.state_dict())
    assert AutoTokenizer.from_pretrained(out / "model")("ab")["input_ids"] == make_tokenizer()("ab")["input_ids"]


def test_cli_qwen3_5_end_to_end(tmp_path, models, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(8, seed=1, segments=1))
    out = tmp_path / "run"
    argv = ["train", "--model", str(models["qwen3_5"]), "--data", str(data), "--out", str(out), "--steps", "10",
            "--lr", "1e-2", "--rank", "8", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "trained 10 steps" in printed and str(out / "model") in printed
    losses = [float(r["loss"]) for r in csv.DictReader((out / "loss.csv").open())]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out / "model")).__name__ == "Qwen3_5ForCausalLM"


@pytest.mark.parametrize("rounding", [None, "stochastic"])
def test_bf16_run_uses_and_records_the_param_rounding(tmp_path, models, rounding):
    """--dtype bfloat16 trains with the optimizer's default rounding (a residual per element, saved with the
    checkpoint) unless --param-rounding says otherwise; run.json records the mode."""
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(4, seed=2, segments=1))
    out = tmp_path / "run"
    argv = ["train", "--model", str(models["llama"]), "--data", str(data), "--out", str(out), "--steps", "3",
            "--lr", "1e-4", "--rank", "4", "--dtype", "bfloat16", "--no-progress"]  # fmt: skip
    assert cli.main(argv + (["--param-rounding", rounding] if rounding else [])) == 0
    expected = rounding or "compensated"
    assert json.loads((out / "run.json").read_text())["param_rounding"] == expected
    state = torch.load(latest_checkpoint(out / "checkpoints") / STATE_FILE, weights_only=True)["optimizer"]["state"]
    residuals = [s["compensation"] for s in state.values() if "compensation" in s]
    if expected == "compensated":
        assert residuals and all(r.dtype == torch.int16 for r in residuals) and any(r.any() for r in residuals)
    else:
        assert not residuals


def test_general_mixing_share_in_a_run(tmp_path, models, monkeypatch):
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(5, seed=2, segments=1))
    general = write_jsonl(tmp_path / "g.jsonl", general_texts(4))
    cfg = TrainConfig(
        model=str(models["llama"]), data=str(data), out=str(tmp_path / "run"), general=str(general),
        general_fraction="1/3", steps=14, lr=1e-3, rank=4, checkpoint_every=0, progress=False,
    )  # fmt: skip
    h = train(cfg).history
    is_general = [g == g for g in h["general"]]  # one item per step: NaN when it was behaviour
    assert [sum(is_general[:n]) for n in range(1, 15)] == [(2 * n + 3) // 6 for n in range(1, 15)]
    assert all((b == b) != g for b, g in zip(h["behaviour"], is_general, strict=True))


def test_interrupted_run_resumes_to_identical_weights(tmp_path, dropout_llama, monkeypatch, capsys):
    """Kill the run after its step-4 checkpoint; --resume must land on the uninterrupted run's weights, bit for bit."""
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(6, seed=3))
    general = write_jsonl(tmp_path / "g.jsonl", general_texts(5))
    common = ["--model", str(dropout_llama), "--data", str(data), "--general", str(general), "--general-fraction",
              "0.3", "--mix-by", "tokens", "--steps", "7", "--grad-accum", "2", "--lr", "5e-3", "--rank", "4",
              "--lr-schedule", "cosine", "--warmup-steps", "2", "--checkpoint-every", "2", "--seed", "5",
              "--no-progress"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(["train", *common, "--out", str(whole)]) == 0

    real_save = loop.save_checkpoint

    def save_then_die(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    assert cli.main(["train", *common, "--out", str(parts)]) == 130
    assert "latest checkpoint is" in capsys.readouterr().err and "step-00000004" in str(
        latest_checkpoint(parts / "checkpoints")
    )
    assert not (parts / "model").exists()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)

    assert cli.main(["train", *common, "--out", str(parts), "--resume"]) == 0
    from safetensors.torch import load_file

    weights_equal(load_file(whole / "model" / "model.safetensors"), load_file(parts / "model" / "model.safetensors"))
    a, b = (list(csv.DictReader((d / "loss.csv").open())) for d in (whole, parts))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 7


def test_step_in_backward_run_equals_the_normal_run_and_resumes(tmp_path, models, monkeypatch):
    """--step-in-backward (layers updated inside the backward, gradients freed) ends on the normal run's weights
    bit for bit (clipping off: global clipping cannot run in backward), also across a kill and --resume."""
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(6, seed=4, segments=2))
    common = ["--model", str(models["qwen3_5"]), "--data", str(data), "--steps", "6", "--lr", "5e-3", "--rank", "4",
              "--max-grad-norm", "0", "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    normal, inb, parts = tmp_path / "normal", tmp_path / "inb", tmp_path / "parts"
    assert cli.main(["train", *common, "--out", str(normal)]) == 0
    assert cli.main(["train", *common, "--step-in-backward", "--out", str(inb)]) == 0
    from safetensors.torch import load_file

    weights_equal(load_file(normal / "model" / "model.safetensors"), load_file(inb / "model" / "model.safetensors"))
    real_save = loop.save_checkpoint

    def save_then_die(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    assert cli.main(["train", *common, "--step-in-backward", "--out", str(parts)]) == 130
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert cli.main(["train", *common, "--out", str(parts), "--resume"]) == 0  # and back to the normal step
    weights_equal(load_file(normal / "model" / "model.safetensors"), load_file(parts / "model" / "model.safetensors"))


def test_step_in_backward_refuses_what_it_cannot_do(tmp_path, models, capsys):
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(2, seed=4, segments=3))
    base = ["train", "--model", str(models["llama"]), "--data", str(data), "--steps", "1", "--step-in-backward",
            "--no-progress"]  # fmt: skip
    cases = [
        ([], "--clip-per"),  # the default --max-grad-norm 1.0 is global clipping
        (["--max-grad-norm", "0", "--grad-accum", "2"], "grad_accum must be 1"),
        (["--max-grad-norm", "0", "--segment-batch", "2"], "raise --segment-batch"),
    ]
    for i, (extra, message) in enumerate(cases):
        assert cli.main([*base, *extra, "--out", str(tmp_path / f"o{i}")]) == 2
        assert message in capsys.readouterr().err
    assert cli.main([*base, "--clip-per", "layer", "--out", str(tmp_path / "ok")]) == 0


def test_cli_errors_are_clear(tmp_path, models, monkeypatch, capsys):
    model = str(models["llama"])
    good = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(2))
    bad = write_jsonl(tmp_path / "bad.jsonl", [copy_behaviour(1)[0], '{"context": "x", "segments": 3}'])
    run = lambda *a: cli.main(["train", "--model", model, "--no-progress", "--rank", "4", *a])

    assert run("--data", str(bad), "--out", str(tmp_path / "r0")) == 2
    assert f'{bad}:2: "segments" must be a list' in capsys.readouterr().err
    assert not (tmp_path / "r0").exists(), "nothing may be written before the data is valid"

    out = str(tmp_path / "r1")
    assert run("--data", str(good), "--out", out, "--steps", "2") == 0
    capsys.readouterr()
    assert run("--data", str(good), "--out", out, "--steps", "2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run("--data", str(good), "--out", out, "--steps", "2", "--lr", "1e-3", "--resume") == 2
    assert "lr: checkpoint 1e-05 vs now 0.001" in capsys.readouterr().err
    assert run("--data", str(good), "--out", out, "--steps", "2", "--overwrite") == 0
    capsys.readouterr()

    assert run("--data", str(good), "--out", str(tmp_path / "r2"), "--general-fraction", "0.5") == 2
    assert "without general data" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_train_on_gpu_in_bf16(tmp_path, models, arch):
    """On CUDA in bf16 through the real frozen path: finite losses that go down, a bf16 model saved."""
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(16, seed=4))
    cfg = TrainConfig(
        model=str(models[arch]), data=str(data), out=str(tmp_path / "run"), epochs=4, lr=1e-2, rank=8,
        device="cuda", dtype="bfloat16", checkpoint_every=0, progress=False,
    )  # fmt: skip
    result = train(cfg)
    losses = torch.tensor(result.history["loss"])
    assert torch.isfinite(losses).all() and losses[-8:].mean() < losses[:8].mean(), losses
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_pad_segments_right_pads_with_ignored_labels(tmp_path):
    _, ex = example_with_empty_prompt(tmp_path, make_tokenizer())
    ids, labels, mask = pad_segments([(s.input_ids, s.labels) for s in ex.segments])
    lengths = [s.input_ids.numel() for s in ex.segments]
    assert ids.shape == labels.shape == mask.shape == (3, max(lengths))
    for row, (seg, n) in enumerate(zip(ex.segments, lengths, strict=True)):
        assert torch.equal(ids[row, :n], seg.input_ids) and torch.equal(labels[row, :n], seg.labels)
        assert (labels[row, n:] == IGNORE).all() and mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    assert pad_segments([(s.input_ids, s.labels) for s in ex.segments[:1]])[2] is None


def test_general_item_is_plain_language_modelling_and_apply_reports_the_norm():
    """A general chunk through the trainer (context None) is the model's own LM loss; apply() clips with it."""
    from apollo_fast import FrozenContextTrainer
    from apollo_fast.toy import tiny_causal_lm
    from apollo_fast.training.data import GeneralItem

    model = tiny_causal_lm(seed=4)
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(4))
    want = model(input_ids=ids[None], labels=ids[None], use_cache=False).loss
    (want * 0.25).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    model.zero_grad(set_to_none=True)

    seen = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    trainer = FrozenContextTrainer(model, Capture(model.parameters(), lr=0.0), max_grad_norm=float(norm) / 2)
    got = loop.item_backward(trainer, GeneralItem(line=1, input_ids=ids), 0.25)
    assert_close("general item loss", want.detach(), got, rtol=0)
    assert_close("grad norm", norm, trainer.apply(), rtol=1e-6)
    assert trainer.last_grad_norm == pytest.approx(float(norm), rel=1e-6) and trainer.optimizer_steps == 1
    for name, g in grads.items():  # clipped to half the norm
        assert_close(f"clipped grad {name}", g / 2, seen[name], rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
