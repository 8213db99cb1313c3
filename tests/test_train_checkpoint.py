"""Checkpoints and saved models: atomic (an interrupted write leaves the previous one valid), weights_only-loadable."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from train_fixtures import make_tokenizer, one_thread

from apollo_fast import APOLLO, apollo_param_groups, atomic
from apollo_fast.toy import tiny_causal_lm
from apollo_fast.training import checkpoint as ckpt


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def trained(seed: int = 0):
    """A tiny model and an APOLLO optimizer with state after two steps."""
    model = tiny_causal_lm(seed=seed)
    opt = APOLLO(apollo_param_groups(model), lr=1e-2, rank=4, seed=seed)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def state_of(opt) -> dict:
    return {"optimizer": opt.state_dict(), "stream": {"items": 3}, "rng": {"torch": torch.get_rng_state()}}


def test_roundtrip_restores_weights_and_optimizer(tmp_path):
    model, opt = trained()
    path = ckpt.save_checkpoint(tmp_path / "ck", 7, model, state_of(opt))
    assert path.name == "step-00000007"
    raw = torch.load(path / ckpt.STATE_FILE, weights_only=True)  # plain containers and tensors only
    assert raw["step"] == 7 and raw["stream"] == {"items": 3}

    fresh, _ = trained(seed=1)
    fresh_opt = APOLLO(apollo_param_groups(fresh), lr=1e-2, rank=4)
    state = ckpt.load_checkpoint(tmp_path / "ck", fresh)  # the folder resolves to its newest checkpoint
    fresh_opt.load_state_dict(state["optimizer"])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert_close(f"state {key}", value, fresh_opt.state[q][key], rtol=0.0)


def test_interrupted_checkpoint_leaves_the_previous_one_valid(tmp_path, monkeypatch):
    model, opt = trained()
    root = tmp_path / "ck"
    ckpt.save_checkpoint(root, 1, model, state_of(opt))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # a torn file, then the process "dies"
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, model, state_of(opt))
    monkeypatch.undo()

    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"], "a partial checkpoint is visible"
    assert ckpt.latest_checkpoint(root).name == "step-00000001"
    restored, _ = trained(seed=3)
    state = ckpt.load_checkpoint(root, restored)
    assert state["step"] == 1
    for name, value in restored.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_killed_save_leftovers_are_ignored_then_cleaned(tmp_path):
    """A hard kill (no cleanup) leaves a temp dir: it is never taken for a checkpoint and the next save removes it."""
    model, opt = trained()
    root = tmp_path / "ck"
    ckpt.save_checkpoint(root, 1, model, state_of(opt))
    junk = root / ".tmp-step-00000002-abc"
    junk.mkdir()
    (junk / ckpt.STATE_FILE).write_bytes(b"torn")
    assert ckpt.latest_checkpoint(root).name == "step-00000001"
    ckpt.save_checkpoint(root, 3, model, state_of(opt))
    assert not junk.exists()
    assert [p.name for p in sorted(root.iterdir())] == ["step-00000001", "step-00000003"]


def test_keep_prunes_old_checkpoints_and_resave_replaces(tmp_path):
    model, opt = trained()
    root = tmp_path / "ck"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, model, state_of(opt), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    ckpt.save_checkpoint(root, 4, model, {"note": "again"}, keep=2)  # same step again: swapped in whole
    assert ckpt.load_checkpoint(root)["note"] == "again"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt.load_checkpoint(tmp_path / "nothing")


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "loss.csv"
    atomic.atomic_write_text(path, "old\n")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.csv"], "temp file left behind"


def test_save_pretrained_atomic_replaces_whole_or_not_at_all(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _ = trained()
    tok = make_tokenizer()
    out = tmp_path / "model"
    atomic.save_pretrained_atomic(model, tok, out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == tok("ab")["input_ids"]
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    other, _ = trained(seed=5)
    with pytest.raises(KeyboardInterrupt):
        atomic.save_pretrained_atomic(other, BrokenTokenizer(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "temp dir left behind"
    again = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: the interrupted save changed the saved model"


def test_manifest_detects_damage_and_loading_falls_back_to_the_newest_good_checkpoint(tmp_path):
    model, opt = trained()
    root = tmp_path / "ck"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, model, {"note": step}, keep=3)
    for step in (1, 2, 3):
        ckpt.verify_checkpoint(root / f"step-{step:08d}")
    newest = root / "step-00000003"
    raw = bytearray((newest / ckpt.MODEL_FILE).read_bytes())
    raw[-1] ^= 1  # one flipped bit in the last weight: every parser would still accept it
    (newest / ckpt.MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: sha256 differs from the manifest"):
        ckpt.verify_checkpoint(newest)
    state = ckpt.load_checkpoint(root, model)
    assert state["note"] == 2 and state["path"] == str(root / "step-00000002")
    assert state["skipped"] == [(str(newest), f"{newest / ckpt.MODEL_FILE}: sha256 differs from the manifest "
                                              "(the file is corrupted)")]  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs") as err:
        ckpt.load_checkpoint(newest, model)  # named explicitly: an error that names the good one
    assert err.value.good == root / "step-00000002" and str(root / "step-00000002") in str(err.value)

    (root / "step-00000002" / ckpt.STATE_FILE).write_bytes(b"")
    (root / "step-00000001" / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint") as err:
        ckpt.load_checkpoint(root, model)
    assert "trainer.pt: 0 bytes, the manifest says" in str(err.value)
    assert "step-00000001/manifest.json: missing" in str(err.value)
    moved = ckpt.quarantine(newest)
    assert moved.name == "corrupt-step-00000003" and ckpt.latest_checkpoint(root).name == "step-00000002"
