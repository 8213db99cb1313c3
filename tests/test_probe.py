"""The probes against planted effects and null runs, on tiny models (apollo_fast.probe).

Each probe must report a planted effect (with a CI that excludes zero) and report a null run as no
effect (CIs holding zero, changes of exactly 0 for identical models). The data seeds are fixed: a 95%
interval misses the truth in 5% of draws by construction, so a test must not redraw them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _probe_toys import attention_pair, feature_model, feature_pairs, hybrid_model, plant_gdn
from frozen_models import build
from train_fixtures import one_thread

from apollo_fast.probe import StatOptions, TrainSettings, dose, gdn_state, learning_rate, steering, transfer
from apollo_fast.probe.toy import MappingTask
from apollo_fast.steering import SteeringVector
from apollo_fast.toy import tiny_causal_lm

FAST = TrainSettings(lr=1e-2, epochs=3.0, rank=16)
STATS = StatOptions(n_boot=1000)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def task():
    return MappingTask(seed=0)


def _llama(seed: int = 0):
    return tiny_causal_lm(vocab=64, hidden=32, layers=2, heads=4, seed=seed).eval()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dose_report(task):
    model = _llama()
    before = _weights(model)
    report = dose(
        model, task.examples(64), task.pairs(40), ns=(4, 16, 64), seeds=2, settings=FAST, stats=STATS, progress=False
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "dose must leave the base weights in the model"
    return report


def test_dose_finds_an_effect_that_grows_with_n(dose_report):
    pts = dose_report.data["points"]
    effects = [p["margin_change"] for p in pts]
    assert effects == sorted(effects) and effects[-1] > 5.0, effects
    assert pts[-1]["verdict"] == "positive" and pts[-1]["ci"][0] > 0
    assert pts[-1]["preference_change_ci"][0] > 0
    assert dose_report.data["smallest_n"] in (4, 16, 64)
    first = next(p for p in pts if p["verdict"] == "positive")
    assert first["n"] == dose_report.data["smallest_n"]
    assert [p["steps"] for p in pts] == [12, 48, 192]  # 3 epochs of n examples, one per step


def test_dose_shuffled_target_null_holds_zero(dose_report):
    (null,) = dose_report.data["null"]
    assert null["n"] == 64 and null["shuffled_targets"]
    assert null["ci"][0] <= 0 <= null["ci"][1], null
    assert null["verdict"] != "positive"
    assert abs(null["margin_change"]) < dose_report.data["points"][-1]["margin_change"] / 5


def test_dose_report_files(dose_report, tmp_path):
    import json

    out = dose_report.save(tmp_path / "dose")
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "dose.png"}
    assert (out / "dose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert data["probe"] == "dose" and data["points"][0]["n"] == 4
    md = (out / "report.md").read_text()
    assert "| 64 |" in md and "null: n=64, targets shuffled" in md and "Smallest n" in md
    with pytest.raises(FileExistsError):
        dose_report.save(out)  # never overwritten without overwrite=True
    dose_report.save(out, overwrite=True)


def test_dose_null_runs_no_effect_and_shuffled_labels(task):
    """A learning rate too small to move anything: the CI lies inside +-min_effect, 'no effect' (not 'not enough
    data'). Pair labels swapped by a coin: the planted effect averages out and the CI holds zero."""
    tiny = dose(
        _llama(),
        task.examples(64),
        task.pairs(40),
        ns=(4, 16),
        seeds=2,
        null="none",
        settings=TrainSettings(lr=1e-7, epochs=3.0, rank=16),
        stats=STATS,
        progress=False,
    )
    for p in tiny.data["points"]:
        assert p["verdict"] == "no effect", p
        assert -0.1 <= p["ci"][0] <= p["ci"][1] <= 0.1
    assert tiny.data["smallest_n"] is None
    coin = np.random.default_rng(7).random(40) < 0.5
    swapped = [
        dict(p, desired=p["undesired"], undesired=p["desired"]) if c else p
        for p, c in zip(task.pairs(40), coin, strict=True)
    ]
    shuffled = dose(
        _llama(), task.examples(64), swapped, ns=(64,), seeds=2, null="none", settings=FAST, stats=STATS, progress=False
    )
    (p,) = shuffled.data["points"]
    assert p["ci"][0] <= 0 <= p["ci"][1] and p["verdict"] == "not enough data to tell", p


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_dose_trains_and_scores_hybrid_models_on_the_frozen_path(task, arch):
    """GDN models through the whole probe: frozen-context training, long prompts scored on the frozen path."""
    model = build(arch, seed=1)
    before = _weights(model)
    long_pairs = [dict(p, prompt=p["prompt"] * 20) for p in task.pairs(12)]  # >= 256 tokens each
    report = dose(
        model,
        task.examples(8),
        long_pairs,
        ns=(2, 4),
        seeds=1,
        settings=TrainSettings(lr=1e-3, steps=2, rank=8),
        stats=STATS,
        progress=False,
    )
    assert [p["steps"] for p in report.data["points"]] == [2, 2] and len(report.data["null"]) == 1
    assert all(np.isfinite(p["margin_change"]) and p["margin_change"] != 0.0 for p in report.data["points"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lr_effect_against_damage_and_the_rule(task):
    report = learning_rate(
        _llama(),
        task.examples(64),
        task.pairs(40),
        lrs=(1e-4, 1e-3, 3e-2),
        n=32,
        seeds=2,
        general=task.texts(20),
        settings=TrainSettings(epochs=2.0, rank=16),
        stats=STATS,
        progress=False,
    )
    pts = {p["lr"]: p for p in report.data["points"]}
    assert pts[1e-3]["margin_change"] > pts[1e-4]["margin_change"] > 0
    assert pts[3e-2]["damage_ci"][0] > 0.05  # a large rate damages the general data ...
    assert abs(pts[1e-4]["damage"]) < 0.01  # ... a small one does not
    eligible = [p for p in pts.values() if p["damage_ci"][1] <= 0.05 and p["verdict"] == "positive"]
    best = max(eligible, key=lambda p: p["ci"][0])
    assert report.data["best_lr"] == best["lr"] != 3e-2  # the stated rule
    assert "lr.png" in report.figures and "**(best)**" in report.markdown


@pytest.fixture(scope="module")
def trained_pair(task):
    from apollo_fast.probe.training import train_run

    base = _llama()
    trained = copy.deepcopy(base)
    train_run(trained, task.examples(64), FAST, seed=0)
    return base, trained


def test_transfer_sees_the_trained_set_improve(task, trained_pair):
    base, trained = trained_pair
    report = transfer(
        base, trained, {"behaviour": task.pairs(40), "random text": task.texts(20)}, stats=STATS, progress=False
    )
    sets = {s["name"]: s for s in report.data["sets"]}
    b = sets["behaviour"]
    assert b["kind"] == "pairs" and b["ppl_after"] < b["ppl_before"]
    assert b["ci"][1] < 0 and b["verdict"] == "improves"  # CI entirely on the improving side
    assert b["margin_ci"][0] > 0 and b["margin_verdict"] == "improves"
    assert sets["random text"]["kind"] == "text" and sets["random text"]["n_items"] == 20


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_transfer_identical_models_change_nothing(task, arch):
    base = tiny_causal_lm(vocab=64, hidden=32, layers=2 if arch == "llama" else 4, seed=1, arch=arch).eval()
    long_pairs = [dict(p, prompt=p["prompt"] * 20) for p in task.pairs(12)]  # >= 256 tokens: frozen path
    report = transfer(
        base, copy.deepcopy(base), {"pairs": long_pairs, "text": task.texts(12)}, stats=STATS, progress=False
    )
    for s in report.data["sets"]:
        assert s["delta"] == 0.0 and s["ci"] == [0.0, 0.0] and s["verdict"] == "no effect", s
    assert report.data["sets"][0]["margin_delta"] == 0.0


def test_gdn_state_planted_direction_in_one_gdn_layer():
    base, common = hybrid_model()
    trained, direction = plant_gdn(base, common, layer=2, head=1, dim=3)
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 64, int(rng.integers(8, 30))).tolist() for _ in range(16)]
    other = torch.randn(32, generator=torch.Generator().manual_seed(9))
    sv = SteeringVector({2: direction, 0: other}, 32, 3)
    report = gdn_state(base, trained, contexts, vector=sv, stats=STATS, progress=False)
    layers = report.data["layers"]
    assert [r["kind"] for r in layers] == ["gdn", "attention", "gdn"]
    for r in layers[:2]:  # nothing before the planted layer changes, exactly
        assert r["rel_change"] == 0.0 and r["cosine"] == 1.0 and r["readout_change"] == 0.0, r
        assert r["input_change"] == 0.0
    planted = layers[2]
    assert planted["rel_change"] > 0.05 and planted["rel_change_ci"][0] > 0
    assert planted["input_change"] == 0.0  # its input did not change: its own weights did it
    assert [h["rel_change"] > 0 for h in planted["heads"]] == [False, True, False, False]  # one head only
    assert planted["readout_change"] > 0.01
    assert planted["alignment"] > 0.9 > planted["baseline"]
    assert planted["alignment_ci"][0] > planted["baseline"]
    assert planted["axis_share"] > 0.8
    assert report.data["baseline"] == pytest.approx(1.96 / 32**0.5, rel=0.1)
    # the same readout change against an unrelated direction stays at the random-direction level
    unrelated = gdn_state(
        base, trained, contexts, vector=SteeringVector({2: other}, 32, 3), stats=STATS, progress=False
    ).data["layers"][2]
    assert abs(unrelated["alignment"]) < unrelated["baseline"]


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_gdn_state_identical_models_report_zero_change(arch):
    base = build(arch, seed=3)
    contexts = [list(range(5, 25)), list(range(30, 41))] * 5
    sv = SteeringVector({i: torch.randn(32) for i in range(4)}, 32, 4)
    report = gdn_state(base, copy.deepcopy(base), contexts, vector=sv, stats=STATS, progress=False)
    assert [r["kind"] for r in report.data["layers"]] == ["gdn", "attention", "gdn", "attention"]
    for r in report.data["layers"]:
        assert r["rel_change"] == 0.0 and r["rel_change_ci"] == [0.0, 0.0] and r["cosine"] == 1.0
        assert r["readout_change"] == 0.0 and r["alignment"] == 0.0 and r["axis_share"] == 0.0
        assert all(h["rel_change"] == 0.0 for h in r["heads"])


def test_gdn_state_attention_readout_on_an_attention_only_model():
    base, trained, direction = attention_pair()
    rng = np.random.default_rng(1)
    contexts = [rng.integers(0, 64, int(rng.integers(6, 20))).tolist() for _ in range(12)]
    report = gdn_state(
        base, trained, contexts, vector=SteeringVector({1: direction}, 32, 2), stats=STATS, progress=False
    )
    first, last = report.data["layers"]
    assert first["kind"] == last["kind"] == "attention"
    assert first["rel_change"] == 0.0 and first["readout_change"] == 0.0
    assert last["rel_change"] > 0 and [h["rel_change"] > 0 for h in last["heads"]] == [False, False, True, False]
    assert last["alignment"] == pytest.approx(1.0, abs=1e-5)  # a value-bias shift moves o exactly along e_dim


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next", "llama"])
def test_readout_is_the_mixer_output_for_the_next_token(arch):
    """The readout with the trained model's own state equals the token mixer's output at the last position of a
    plain transformers forward over the whole context (the definition in the README)."""
    from apollo_fast import encode_context
    from apollo_fast.frozen import segment_logits
    from apollo_fast.probe.gdn_state import _Readout

    model = build(arch, seed=2)
    ids = torch.randint(0, 97, (1, 19), generator=torch.Generator().manual_seed(4))
    ctx = encode_context(model, ids[:, :-1])
    with torch.no_grad(), _Readout(model, ctx.layer_kinds) as rec:
        segment_logits(model, ctx, ids[:, -1:])
        frozen = dict(rec.out)
        model(input_ids=ids, use_cache=False)
        full = dict(rec.out)
    for i in range(len(ctx.layer_kinds)):
        torch.testing.assert_close(frozen[i], full[i], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def steering_report():
    model, _ = feature_model()
    return steering(model, feature_pairs(40), coefs=(1.0, 4.0), stats=STATS, n_perm=100, progress=False)


def test_steering_separates_a_planted_feature(steering_report):
    b = {x["name"]: x for x in steering_report.data["behaviours"]}
    planted = b["planted"]
    assert steering_report.data["ranking"][0] == "planted"
    for r in planted["layers"]:
        assert r["verdict"] == "separable" and r["auc_ci"][0] > 0.9 and r["p_value"] < 0.05
    assert planted["best_steering"]["verdict"] == "positive" and planted["best_steering"]["ci"][0] > 0.3


@pytest.mark.parametrize("name", ["no feature", "shuffled"])
def test_steering_null_sets_are_not_separable(steering_report, name):
    b = next(x for x in steering_report.data["behaviours"] if x["name"] == name)
    for r in b["layers"]:
        assert r["verdict"] != "separable" and r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1], r
        for s in r["steering"]:
            assert s["ci"][0] <= 0 <= s["ci"][1] and s["verdict"] != "positive", s
    assert b["best_auc"] < 0.75
