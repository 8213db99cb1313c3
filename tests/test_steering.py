"""Steering vectors: extraction (hand-checked, padding), the steer context manager (exact, KV cache,
leaves the model untouched), verify and bake on a tiny trained model, save/load, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from _steering_toys import MODE_A, MODE_B, held_out_pairs, mode_pairs, trained_mode_model, word_tokenizer, words
from helpers import assert_close

from apollo_fast.steering import (
    SteeringVector,
    bake_steering,
    capture_hidden,
    directions_from_differences,
    extract_steering_vector,
    full_sequence_forward,
    hidden_at,
    steer,
    verify_steering,
)
from apollo_fast.toy import tiny_causal_lm


@pytest.fixture(scope="module")
def random_model():
    return tiny_causal_lm(seed=3).eval()


@pytest.fixture(scope="module")
def mode_model():
    return trained_mode_model()


def _ragged_pairs(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        d = torch.randint(0, 64, (3 + i % 3,), generator=g).tolist()
        u = torch.randint(0, 64, (2 + (i * 2) % 5,), generator=g).tolist()
        out.append((d, u))
    return out


@torch.no_grad()
def _hidden_alone(model, seq, layer, pos):
    with capture_hidden(model, [layer]) as store:
        model(input_ids=torch.tensor([seq]))
    return store[layer][0, pos]


@pytest.mark.parametrize("position", [-1, -2, 1])
def test_mean_diff_matches_unpadded_manual(random_model, position):
    pairs = _ragged_pairs()
    sv = extract_steering_vector(random_model, pairs, layers=[0, 1], position=position, batch_size=3)
    for layer in (0, 1):
        diffs = torch.stack(
            [
                _hidden_alone(random_model, d, layer, position) - _hidden_alone(random_model, u, layer, position)
                for d, u in pairs
            ]
        )
        assert_close(f"layer {layer} direction", diffs.mean(0), sv.directions[layer], 1e-5)
    assert sv.hidden_size == 64 and sv.num_layers == 2 and sv.position == position


def test_position_out_of_range_is_an_error(random_model):
    with pytest.raises(ValueError, match="position 5"):
        extract_steering_vector(random_model, [([1, 2, 3], [4, 5, 6])], position=5)
    with pytest.raises(ValueError, match="out of range"):
        extract_steering_vector(random_model, [([1, 2], [3, 4])], layers=[2])


def test_directions_hand_computed():
    d = torch.tensor([[3.0, 1.0], [3.0, -1.0]])
    assert_close("mean_diff", torch.tensor([3.0, 0.0]), directions_from_differences(d, "mean_diff"), 0.0)
    assert_close("pca", torch.tensor([3.0, 0.0]), directions_from_differences(d, "pca"), 1e-6)
    neg = torch.tensor([[-2.0, 0.0], [-4.0, 0.0]])  # PCA sign follows the mean difference
    assert_close("pca sign", torch.tensor([-3.0, 0.0]), directions_from_differences(neg, "pca"), 1e-6)
    # mostly along (1,1), with spread: first singular vector is (1,1)/sqrt2, scaled by mean . v
    d = torch.tensor([[2.0, 2.0], [1.0, 1.0], [0.5, -0.5]])
    v = torch.tensor([1.0, 1.0]) / 2**0.5
    assert_close("pca diag", v * (d.mean(0) @ v), directions_from_differences(d, "pca"), 1e-6)


def test_strings_with_tokenizer_match_ids(random_model):
    tok = word_tokenizer()
    ids = _ragged_pairs(4, seed=1)
    ids = [([t % 62 + 2 for t in d], [t % 62 + 2 for t in u]) for d, u in ids]
    text = [{"desired": words(d), "undesired": words(u)} for d, u in ids]
    a = extract_steering_vector(random_model, ids, method="pca")
    b = extract_steering_vector(random_model, text, method="pca", tokenizer=tok)
    for layer in a.layers:
        assert_close(f"layer {layer}", a.directions[layer], b.directions[layer], 1e-6)
    with pytest.raises(ValueError, match="no tokenizer"):
        extract_steering_vector(random_model, text)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def test_steer_is_exact_and_leaves_model_untouched(random_model):
    sv = extract_steering_vector(random_model, _ragged_pairs())
    x = torch.randint(0, 64, (2, 7))
    params, hooks = _snapshot(random_model)
    with torch.no_grad():
        ref = random_model(input_ids=x).logits
        with capture_hidden(random_model, [0]) as plain:
            random_model(input_ids=x)
        h0 = plain[0].clone()
        with steer(random_model, sv, 2.5, layers=[0]), capture_hidden(random_model, [0]) as st:
            steered_logits = random_model(input_ids=x).logits
        # at the hooked layer: exactly h + c * d at every position
        assert_close("layer 0 output", h0 + 2.5 * sv.directions[0], st[0], 1e-6)
        assert (steered_logits - ref).abs().max() > 1e-3, "steering changed nothing"
        with pytest.raises(RuntimeError, match="boom"), steer(random_model, sv, 1.0):
            raise RuntimeError("boom")
        after = random_model(input_ids=x).logits
    new_params, new_hooks = _snapshot(random_model)
    assert new_hooks == hooks, "hooks left behind"
    for k, v in params.items():
        assert torch.equal(v, new_params[k]), f"{k} changed"
    assert torch.equal(ref, after), "model output differs after the context manager"


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_steer_applies_to_tokens_generated_with_kv_cache(random_model, arch):
    # qwen3_5 with 4 layers: 3 Gated-DeltaNet layers (recurrent-state cache) + 1 attention layer
    if arch == "qwen3_5":
        random_model = tiny_causal_lm(arch="qwen3_5", layers=4, seed=3).eval()
    sv = extract_steering_vector(random_model, _ragged_pairs())
    prompt = torch.randint(0, 64, (1, 5))
    with torch.no_grad(), steer(random_model, sv, 3.0):
        out = random_model.generate(
            prompt,
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        no_cache = random_model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        full = random_model(input_ids=out.sequences).logits[0]
    assert torch.equal(out.sequences, no_cache), "cached and uncached steered generation differ"
    cached = torch.stack(out.logits, 1)[0]  # (new tokens, vocab)
    n = cached.shape[0]
    assert_close("logits of generated steps", full[-n - 1 : -1], cached, 1e-4)
    with torch.no_grad():
        plain = random_model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out.sequences), "steering did not change generation"


def test_wrong_model_shape_is_a_clear_error(random_model):
    sv = extract_steering_vector(random_model, _ragged_pairs(), layers=[1])
    with pytest.raises(ValueError, match="hidden size 64, the model has 32"):
        with steer(tiny_causal_lm(hidden=32, seed=0), sv):
            pass
    with pytest.raises(ValueError, match="2 layers, the model has 3"):
        with steer(tiny_causal_lm(layers=3, seed=0), sv):
            pass
    with pytest.raises(ValueError, match=r"no direction for layers \[0\]"):
        with steer(random_model, sv, layers=[0]):
            pass
    with pytest.raises(ValueError, match="another model"):
        sv.check_compatible(tiny_causal_lm(seed=9), check_weights=True)


def test_save_load_round_trip(random_model, tmp_path):
    sv = extract_steering_vector(random_model, _ragged_pairs(), layers=[1], method="pca", position=-2)
    path = sv.save(tmp_path / "s.safetensors")
    back = SteeringVector.load(path)
    assert back.layers == [1] and back.method == "pca" and back.position == -2
    assert back.model == sv.model and back.model["fingerprint"]
    assert back.hidden_size == 64 and back.num_layers == 2
    assert_close("layer 1", sv.directions[1], back.directions[1], 0.0)
    from apollo_fast.vectors import TaskVector

    with pytest.raises(ValueError, match="not an apollo_fast steering vector"):
        TaskVector.from_tensors({"x": torch.zeros(1)}).save(tmp_path / "t.safetensors")
        SteeringVector.load(tmp_path / "t.safetensors")


def test_verify_on_trained_model(mode_model):
    model, task = mode_model
    sv = extract_steering_vector(model, mode_pairs(task, list(range(2, 42))))
    held = held_out_pairs(task, list(range(42, 63)))
    r = verify_steering(model, sv, held, coefficient=4.0, layers=[0])
    assert r.margin_off < -2.0, f"un-steered model should prefer mode B: margin {r.margin_off:.2f}"
    assert r.margin_change > 2.0, f"steering toward mode A moved the margin by only {r.margin_change:.2f} nats"
    # at the hooked layer the shift is exactly coefficient * |direction|
    assert abs(r.projection[0]["shift"] - 4.0 * sv.directions[0].norm().item()) < 1e-4
    # the direction separates held-out mode-A from mode-B sequences it was not extracted from
    ha = hidden_at(model, [[MODE_A, y] for y in range(42, 63)], [0])[0] @ sv.unit(0)
    hb = hidden_at(model, [[MODE_B, y] for y in range(42, 63)], [0])[0] @ sv.unit(0)
    assert (ha > hb).float().mean() > 0.9, "held-out separation missing"
    zero = verify_steering(model, sv, held, coefficient=0.0)
    assert abs(zero.margin_change) < 1e-5


def test_bake_reduces_kl_and_keeps_effect(mode_model):
    model, task = mode_model
    model = copy.deepcopy(model)
    sv = extract_steering_vector(model, mode_pairs(task, list(range(2, 42))))
    prompts = [[MODE_B, y] for y in range(2, 42)] + [[MODE_A, y] for y in range(2, 22)]
    held = held_out_pairs(task, list(range(42, 63)))
    r = bake_steering(
        model, sv, prompts, coefficient=4.0, layers=[0], steps=40, lr=1e-2, batch_size=20, eval_pairs=held
    )
    assert r.kl_after < 0.5 * r.kl_before, f"KL {r.kl_before:.4f} -> {r.kl_after:.4f}"
    assert r.margin_retained is not None and r.margin_retained > 0.5, f"retained {r.margin_retained}"
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0, "bake must leave no hook behind"


def test_bake_context_goes_through_pluggable_forward(random_model):
    model = copy.deepcopy(random_model)
    sv = extract_steering_vector(model, _ragged_pairs())
    calls = []

    def frozen_context_stub(m, context, ids, mask):
        calls.append((None if context is None else context.tolist(), tuple(ids.shape)))
        return full_sequence_forward(m, context, ids, mask)

    r = bake_steering(
        model,
        sv,
        [[5, 6, 7], [8, 9]],
        coefficient=2.0,
        steps=3,
        lr=1e-3,
        batch_size=2,
        context=[1, 2, 3, 4],
        segment_forward=frozen_context_stub,
    )
    assert len(calls) == 3 + 2 and all(c == [1, 2, 3, 4] for c, _ in calls)  # 3 steps + KL before / after
    assert calls[0][1] == (2, 3)
    assert r.kl_before > 0 and r.steps == 3
    with pytest.raises(ValueError, match="steps"):
        bake_steering(model, sv, [[1]], steps=-1)


def test_bake_with_context_trains_through_the_frozen_context_step(random_model, monkeypatch):
    """With a context and no segment_forward, the student runs the frozen-context step: its logits equal
    the full sequence's (so KL before is the same), the context gets no gradient path, and KL falls."""
    from apollo_fast.steering import bake as bake_mod

    model = copy.deepcopy(random_model)
    sv = extract_steering_vector(model, _ragged_pairs())
    ctx = [1, 2, 3, 4, 5, 6]
    used = []
    real = bake_mod.frozen_context_forward

    def spy(m, context, ids, mask):
        used.append(tuple(ids.shape))
        out = real(m, context, ids, mask)
        with torch.no_grad():
            ref = full_sequence_forward(m, context, ids, mask)
        real_rows = mask.bool()
        assert torch.allclose(out[real_rows], ref[real_rows], atol=1e-4), "frozen logits differ from full sequence"
        return out

    monkeypatch.setattr(bake_mod, "frozen_context_forward", spy)
    r = bake_steering(model, sv, [[5, 6, 7], [8, 9, 10]], coefficient=3.0, steps=15, lr=1e-2, batch_size=2, context=ctx)
    assert len(used) == 15 + 2
    assert r.kl_after < r.kl_before, f"KL {r.kl_before:.4f} -> {r.kl_after:.4f}"
