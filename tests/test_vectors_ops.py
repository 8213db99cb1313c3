"""Task vectors: hand-computed cases for every operation, invariants, errors, I/O round trips."""

from __future__ import annotations

import json
import math
import os
import stat
import warnings

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file, save_file

from apollo_fast.vectors import (
    SafetensorsSource,
    TaskVector,
    add_vectors,
    apply_task_vectors,
    apply_to_checkpoint,
    dare,
    dare_reference,
    extract_task_vector,
    kth_largest_magnitude,
    model_trim_thresholds,
    ties_merge,
    ties_reference,
)
from apollo_fast.vectors.io import write_safetensors

T = torch.tensor


def tv(**tensors: list[float]) -> TaskVector:
    return TaskVector.from_tensors({k.replace("_", "."): T(v) for k, v in tensors.items()})


def test_extract_hand_computed_skips_int_buffers():
    base = {"w": T([[1.0, 2.0], [3.0, 4.0]]), "b": T([0.5]), "pos": torch.arange(3)}
    ft = {"w": T([[1.5, 1.0], [3.0, 6.0]]), "b": T([0.25]), "pos": torch.arange(3) + 1}
    v = extract_task_vector(base, ft)
    assert sorted(v.keys()) == ["b", "w"], "integer buffer 'pos' must be skipped"
    assert_close("w", T([[0.5, -1.0], [0.0, 2.0]]), v["w"], 0.0)
    assert_close("b", T([-0.25]), v["b"], 0.0)
    assert v["w"].dtype == torch.float32
    assert v.method["skipped_non_float"] == ["pos"]


def test_extract_bf16_is_fp32_difference():
    base = {"w": T([1.0, 2.0, 3.0]).bfloat16()}
    ft = {"w": T([1.0078125, 2.0, 2.0]).bfloat16()}
    v = extract_task_vector(base, ft)
    assert v["w"].dtype == torch.float32
    assert_close("w", T([0.0078125, 0.0, -1.0]), v["w"], 0.0)


def test_mismatch_errors_list_keys_and_shapes():
    base = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(2, 2)}
    ft = {"a": torch.zeros(2), "c": torch.zeros(2, 3), "d": torch.zeros(1)}
    with pytest.raises(ValueError) as e:
        extract_task_vector(base, ft)
    msg = str(e.value)
    assert "only in base: b" in msg and "only in finetuned: d" in msg and "c: base (2, 2) vs finetuned (2, 3)" in msg


def test_vocab_policy():
    base = {"model.embed_tokens.weight": T([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), "x": T([1.0])}
    ft = {"model.embed_tokens.weight": T([[1.5, 1.0], [2.0, 0.0], [3.0, 3.0], [9.0, 9.0]]), "x": T([2.0])}
    with pytest.raises(ValueError, match="vocabulary size mismatch.*embed_tokens"):
        extract_task_vector(base, ft)
    v = extract_task_vector(base, ft, vocab_policy="base")
    # shared rows get the difference, the fine-tune's added row 3 is dropped, shape is the base's
    assert_close("embed", T([[0.5, 0.0], [0.0, -2.0], [0.0, 0.0]]), v["model.embed_tokens.weight"], 0.0)
    # the other way round (vocab shrank): rows only the base has get 0
    v2 = extract_task_vector(ft, base, vocab_policy="base")
    assert_close("embed", T([[-0.5, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]), v2["model.embed_tokens.weight"], 0.0)
    # a non-vocabulary tensor of different shape is still an error
    with pytest.raises(ValueError, match="shape mismatch: x"):
        extract_task_vector({"x": T([1.0])}, {"x": T([1.0, 2.0])}, vocab_policy="base")


def test_arithmetic_hand_computed():
    a, b = tv(w=[1.0, -2.0]), tv(w=[0.5, 4.0])
    assert_close("a+b", T([1.5, 2.0]), (a + b)["w"], 0.0)
    assert_close("a-b", T([0.5, -6.0]), (a - b)["w"], 0.0)
    assert_close("-a", T([-1.0, 2.0]), (-a)["w"], 0.0)
    assert_close("3a", T([3.0, -6.0]), (3 * a)["w"], 0.0)
    assert_close("a*0.5", T([0.5, -1.0]), (a * 0.5)["w"], 0.0)
    assert_close("2a-b", T([1.5, -8.0]), add_vectors([a, b], [2.0, -1.0])["w"], 0.0)
    with pytest.raises(ValueError, match="missing in vector 1: w"):
        a + tv(v=[1.0, 2.0])


def test_negation_cancels_addition():
    torch.manual_seed(0)
    base = {"w": torch.randn(5, 7), "b": torch.randn(7)}
    v = TaskVector.from_tensors({"w": torch.randn(5, 7), "b": torch.randn(7)})
    u = TaskVector.from_tensors({"w": torch.randn(5, 7), "b": torch.randn(7)})
    for k in base:
        assert_close(k, torch.zeros_like(base[k]), (v + (-v))[k], 0.0)
        assert_close(k, u[k], ((u + v) + (-v))[k], 1e-6)
    model = torch.nn.Linear(7, 5)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    vw = TaskVector.from_tensors({"weight": torch.randn(5, 7), "bias": torch.randn(5)})
    vw.apply_to(model, 0.7, check_base="ignore")
    (-vw).apply_to(model, 0.7, check_base="ignore")
    for k, t in model.state_dict().items():
        assert_close(k, before[k], t, 1e-6)


def test_apply_hand_computed_keeps_dtype_and_checks():
    model = torch.nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(T([[1.0, 2.0], [3.0, 4.0]]))
    v = TaskVector.from_tensors({"weight": T([[1.0, -1.0], [0.5, 0.0]])})
    apply_task_vectors(model, [v, v], [2.0, -0.5], check_base="ignore")  # net coefficient 1.5
    assert model.weight.dtype == torch.bfloat16
    assert_close("weight", T([[2.5, 0.5], [3.75, 4.0]]), model.weight.float(), 0.0)
    with pytest.raises(ValueError, match="lacks: bias"):
        apply_task_vectors(model, [TaskVector.from_tensors({"bias": T([1.0, 1.0])})])
    with pytest.raises(ValueError, match=r"weight: vector \(3,\) vs model \(2, 2\)"):
        apply_task_vectors(model, [TaskVector.from_tensors({"weight": T([1.0, 1.0, 1.0])})])


def test_apply_warns_or_raises_on_other_base():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    v = extract_task_vector(a, b)
    other = torch.nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="fingerprint"):
        v.apply_to(other)
    with pytest.raises(ValueError, match="fingerprint"):
        v.apply_to(other, check_base="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v.apply_to(a)  # its own base: no warning
    assert_close("weight", b.weight, a.weight, 1e-6)


# ---------------------------------------------------------------- TIES
TAU = [[1.0, -2.0, 3.0, 0.5], [-1.5, 1.0, 2.0, -0.1], [0.2, -0.5, -6.0, 0.3]]


@pytest.mark.parametrize(
    "sign,weights,lam,expected",
    [
        ("sum", None, 1.0, [-1.5, -1.25, -6.0, 0.0]),  # entry 2: 3 + 2 - 6 < 0, only -6 agrees
        ("count", None, 1.0, [-1.5, -1.25, 2.5, 0.0]),  # entry 2: two positive votes, mean(3, 2)
        ("sum", None, 2.0, [-3.0, -2.5, -12.0, 0.0]),
        ("sum", [1.0, 1.0, 0.25], 1.0, [-1.5, -1.7, 2.5, 0.0]),  # weighted: (-2 - 0.125) / 1.25
    ],
)
def test_ties_hand_computed(sign, weights, lam, expected):
    # density 0.5 of 4 entries keeps 2 per vector: [0,-2,3,0], [-1.5,0,2,0], [0,-0.5,-6,0]
    vs = [tv(w=t) for t in TAU]
    merged = ties_merge(vs, density=0.5, lam=lam, weights=weights, trim="tensor", sign=sign)
    assert_close("ties", T(expected), merged["w"], 1e-7)
    assert_close(
        "ties (model trim, one tensor)",
        T(expected),
        ties_merge(vs, density=0.5, lam=lam, weights=weights, trim="model", sign=sign)["w"],
        1e-7,
    )
    assert_close("ties_reference", T(expected), ties_reference(T(TAU), 0.5, weights, sign, lam), 1e-7)
    assert [kth_largest_magnitude(T(t), 2) for t in TAU] == [2.0, 1.5, 0.5]


def test_ties_model_vs_tensor_trim_hand_computed():
    v = tv(a=[4.0, 3.0], b=[0.5, -1.0, 0.2])
    m = ties_merge([v], density=0.4, trim="model")  # keep 2 of 5 over the model: 4 and 3
    assert_close("a", T([4.0, 3.0]), m["a"], 0.0)
    assert_close("b", T([0.0, 0.0, 0.0]), m["b"], 0.0)
    assert m.method["thresholds"] == [3.0]
    t = ties_merge([v], density=0.4, trim="tensor")  # keep round(0.4 n) per tensor: 1 of 2, 1 of 3
    assert_close("a", T([4.0, 0.0]), t["a"], 0.0)
    assert_close("b", T([0.0, -1.0, 0.0]), t["b"], 0.0)


@pytest.mark.parametrize("trim", ["model", "tensor"])
@pytest.mark.parametrize("sign", ["sum", "count"])
def test_ties_single_vector_density_one_is_identity(trim, sign):
    torch.manual_seed(1)
    v = TaskVector.from_tensors({"a": torch.randn(13, 7), "b": torch.randn(1), "c": torch.zeros(3)})
    m = ties_merge([v], density=1.0, trim=trim, sign=sign)
    for k in v.keys():
        assert_close(k, v[k], m[k], 0.0)


def _tied_vectors(n_vec: int, seed: int) -> list[TaskVector]:
    """Vectors of odd-shaped tensors whose values are coarsely rounded, so magnitudes tie a lot."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (37, 11), "b": (4097,), "c": (1,), "d": (5, 3, 7)}
    return [
        TaskVector.from_tensors({k: (torch.randn(s, generator=g) * 4).round() / 4 for k, s in shapes.items()})
        for _ in range(n_vec)
    ]


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
@pytest.mark.parametrize("sign", ["sum", "count"])
def test_streaming_ties_matches_reference_with_ties(monkeypatch, density, sign):
    """Exactly k survive even when many magnitudes equal the threshold; chunk borders change nothing."""
    import apollo_fast.vectors.merge as merge

    monkeypatch.setattr(merge, "CHUNK", 1000)  # several chunks per tensor
    vs = _tied_vectors(3, seed=int(density * 100))
    w = [1.0, 0.5, 2.0]
    keys = vs[0].keys()
    # per tensor: the reference on each tensor
    got = ties_merge(vs, density, lam=0.9, weights=w, trim="tensor", sign=sign)
    for k in keys:
        ref = ties_reference(torch.stack([v[k] for v in vs]), density, w, sign, 0.9)
        assert_close(f"tensor trim: {k}", ref, got[k], 0.0)
    # whole model: the reference on the concatenation of all tensors in key order
    got = ties_merge(vs, density, lam=0.9, weights=w, trim="model", sign=sign)
    flat = torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vs])
    ref = ties_reference(flat, density, w, sign, 0.9)
    start = 0
    for k in keys:
        n = vs[0][k].numel()
        assert_close(f"model trim: {k}", ref[start : start + n].reshape(vs[0].shapes[k]), got[k], 0.0)
        start += n
    one = ties_merge(vs[:1], density, trim="model")
    kept = sum(int(torch.count_nonzero(one[k])) for k in keys)
    nonzero = int(torch.count_nonzero(flat[0]))
    assert kept == min(round(density * flat.shape[1]), nonzero), "whole-model trim must keep exactly k entries"


def test_model_trim_threshold_is_exact_kth_largest():
    gen = torch.Generator().manual_seed(3)
    parts = {
        "a": torch.randn(97, 13, generator=gen),
        "b": torch.randn(4097, generator=gen) * 1e-3,
        "c": torch.zeros(31),
        "d": torch.tensor([0.5, -0.5, 0.5, 2.0**-130]),  # ties and a subnormal
    }
    v = TaskVector.from_tensors(parts)
    flat = torch.cat([t.reshape(-1) for t in parts.values()]).abs().sort(descending=True).values
    for density in (0.0, 1e-4, 0.2, 0.5, 0.9, 0.999, 1.0):
        k = min(flat.numel(), round(density * flat.numel()))
        want = math.inf if k == 0 else (0.0 if k == flat.numel() else flat[k - 1].item())
        got = model_trim_thresholds([v], density)[0]
        assert got == want, f"density {density}: threshold {got} != k-th largest {want}"


def test_ties_rejects_bad_options():
    v = tv(w=[1.0])
    for kw, msg in [
        ({"density": 1.5}, "density"),
        ({"trim": "layer"}, "trim"),
        ({"sign": "max"}, "sign"),
        ({"weights": [1.0, 2.0]}, "weights"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ties_merge([v], **kw)
    with pytest.raises(ValueError, match="inf or NaN"):
        ties_merge([tv(w=[1.0, float("nan")])], density=0.5)


# ---------------------------------------------------------------- DARE
def test_dare_hand_computed():
    x = T([1.0, -2.0, 3.0, 4.0, -5.0, 6.0])
    assert_close("p=0", x, dare(TaskVector.from_tensors({"w": x}), 0.0)["w"], 0.0)
    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(6, generator=torch.Generator().manual_seed(11)) >= 0.25
    out = dare_reference(x, 0.25, gen)
    assert_close("dare", torch.where(keep, x / 0.75, 0.0), out, 0.0)
    no_rescale = dare_reference(x, 0.25, torch.Generator().manual_seed(11), rescale=False)
    assert_close("dare (no rescale)", torch.where(keep, x, 0.0), no_rescale, 0.0)


def test_dare_is_seeded_per_tensor_name():
    v = TaskVector.from_tensors({"a": torch.ones(64), "b": torch.ones(64)})
    d1, d2, d3 = dare(v, 0.5, seed=3), dare(v, 0.5, seed=3), dare(v, 0.5, seed=4)
    assert torch.equal(d1["b"], d2["b"]) and torch.equal(d1["a"], d2["a"])
    assert not torch.equal(d1["a"], d1["b"]), "different tensors must get different masks"
    assert not torch.equal(d1["a"], d3["a"]), "different seeds must give different masks"
    assert set(d1["a"].unique().tolist()) <= {0.0, 2.0}


def test_dare_preserves_expectation():
    # E[dare(x)] = x. Each entry's mean over N draws has std |x| sqrt(p / ((1-p) N)); allow 4.5 std.
    p, n = 0.7, 3000
    x = torch.randn(64, generator=torch.Generator().manual_seed(5))
    draws = torch.stack([dare_reference(x, p, torch.Generator().manual_seed(s)) for s in range(n)])
    std = x.abs() * math.sqrt(p / ((1 - p) * n))
    err = (draws.mean(0) - x).abs()
    assert (err <= 4.5 * std).all(), f"max |mean - x| / std = {(err / std).max():.2f}"
    kept = (draws != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, f"kept fraction {kept:.4f}, expected {1 - p}"


def test_dare_composes_with_ties():
    a, b = tv(w=[1.0, -2.0, 3.0, 4.0]), tv(w=[1.0, 2.0, -1.0, 4.0])
    da, db = dare(a, 0.5, seed=1), dare(b, 0.5, seed=2)
    merged = ties_merge([da, db], density=1.0)
    ref = ties_reference(torch.stack([da["w"], db["w"]]), 1.0)
    assert_close("dare+ties", ref, merged["w"], 0.0)
    assert merged.method["inputs"][0]["op"] == "dare"


# ---------------------------------------------------------------- I/O
@pytest.mark.parametrize("dtype,rtol", [("fp32", 0.0), ("bf16", 4e-3)])
def test_save_load_round_trip(tmp_path, dtype, rtol):
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    v = extract_task_vector(a, b)
    path = v.save(tmp_path / "v.safetensors", dtype=dtype)
    w = TaskVector.load(path)
    assert w.base_model == v.base_model and w.method == v.method
    assert w.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for k in v.keys():
        assert_close(k, v[k], w[k], rtol)
        assert w[k].dtype == torch.float32
    meta = SafetensorsSource(path).metadata
    assert meta["format"] == "apollo_fast.task_vector" and json.loads(meta["base_model"])["fingerprint"]
    # our streaming writer's file is a standard safetensors file
    std = load_file(str(path))
    assert sorted(std) == sorted(v.keys())
    with pytest.raises(ValueError, match="not an apollo_fast task vector"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        TaskVector.load(tmp_path / "plain.safetensors")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "v.safetensors"
    TaskVector.from_tensors({"a": T([1.0]), "b": T([2.0])}).save(path)
    before = path.read_bytes()

    def produce(name):
        if name == "b":
            raise RuntimeError("disk on fire")
        return T([5.0])

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(path, [("a", (1,), torch.float32), ("b", (1,), torch.float32)], produce)
    assert path.read_bytes() == before, "a failed write must not touch the existing file"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, "output keeps mkstemp's 0600 mode"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"], "temporary file left behind"


def _sharded_checkpoint(folder, tensors):
    """Two shards + index json, as save_pretrained writes them."""
    folder.mkdir()
    names = sorted(tensors)
    half = len(names) // 2
    wm = {}
    for i, chunk in enumerate([names[:half], names[half:]]):
        f = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(folder / f))
        wm.update({k: f for k in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["Toy"], "hidden_size": 4}))


def test_sharded_folders_extract_and_apply_streaming(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(4, 4, generator=g).bfloat16() for i in range(5)}
    base["steps"] = torch.arange(4)
    ft = {
        k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() if v.is_floating_point() else v + 1
        for k, v in base.items()
    }
    _sharded_checkpoint(tmp_path / "base", base)
    _sharded_checkpoint(tmp_path / "ft", ft)
    v = extract_task_vector(tmp_path / "base", tmp_path / "ft")
    assert "steps" not in v and v.base_model["architectures"] == ["Toy"]
    out = apply_to_checkpoint(tmp_path / "base", tmp_path / "out", [v], [1.0], max_shard_bytes=100)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files and len(files) > 3
    merged = SafetensorsSource(out)
    assert sorted(merged.keys()) == sorted(base)
    for k in base:
        got = merged.get(k)
        assert got.dtype == base[k].dtype, k
        if base[k].is_floating_point():
            assert_close(k, ft[k].float(), got.float(), 0.0, atol=1e-2)  # base + (ft - base), rounded to bf16
        else:
            assert torch.equal(got, base[k]), f"{k}: integer tensor must be copied unchanged"
    with pytest.raises(FileExistsError):
        apply_to_checkpoint(tmp_path / "base", tmp_path / "out", [v])
