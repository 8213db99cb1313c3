"""CLI end to end on tiny sharded checkpoints in tmp_path: `apollo-fast vectors ...` and `apollo-fast steer ...`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _steering_toys import word_tokenizer, words
from helpers import assert_close

from apollo_fast.cli import main
from apollo_fast.steering import SteeringVector, extract_steering_vector
from apollo_fast.toy import tiny_causal_lm
from apollo_fast.vectors import TaskVector, dare, extract_task_vector, ties_merge


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base, two 'fine-tunes' (perturbed copies) and an incompatible model, saved sharded with a tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = word_tokenizer()
    base = tiny_causal_lm(seed=0)
    out = {}
    for name, seed in (("base", None), ("ft_a", 1), ("ft_b", 2)):
        m = tiny_causal_lm(seed=0)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / name, max_shard_size="100KB")
        tok.save_pretrained(root / name)
        out[name] = root / name
    tiny_causal_lm(layers=3, seed=0).save_pretrained(root / "other")
    out["other"] = root / "other"
    assert (root / "base" / "model.safetensors.index.json").exists(), "fixture should be sharded"
    out["base_model"] = base
    return out


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_vectors_cli_end_to_end(ckpts, tmp_path, capsys):
    base, a, b = ckpts["base"], ckpts["ft_a"], ckpts["ft_b"]
    va_p, vb_p = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("vectors", "extract", "--base", base, "--finetuned", a, "--out", va_p, "--quiet") == 0
    assert "task vector: extract" in capsys.readouterr().out
    assert run("vectors", "extract", "--base", base, "--finetuned", b, "--out", vb_p, "--quiet") == 0
    va, vb = TaskVector.load(va_p), TaskVector.load(vb_p)
    ref_a = extract_task_vector(base, a)
    for k in ref_a.keys():
        assert_close(k, ref_a[k], va[k], 0.0)

    checks = {
        "add": (["vectors", "add", va_p, vb_p, "--weights", "1", "0.5"], va + 0.5 * vb),
        "neg": (["vectors", "negate", va_p], -va),
        "ties": (
            ["vectors", "ties", va_p, vb_p, "--density", "0.5", "--trim", "tensor", "--sign", "count", "--lam", "1.5"],
            ties_merge([va, vb], 0.5, 1.5, trim="tensor", sign="count"),
        ),
        "ties_model": (["vectors", "ties", va_p, vb_p], ties_merge([va, vb])),
        "dare": (["vectors", "dare", va_p, "--p", "0.5", "--seed", "7"], dare(va, 0.5, seed=7)),
        "dare_ties": (
            ["vectors", "ties", va_p, vb_p, "--dare", "0.3", "--density", "1", "--seed", "2"],
            ties_merge([dare(va, 0.3, seed=2), dare(vb, 0.3, seed=3)], 1.0),
        ),
    }
    for name, (argv, want) in checks.items():
        out = tmp_path / f"{name}.safetensors"
        assert run(*argv, "--out", out, "--quiet") == 0, name
        got = TaskVector.load(out)
        for k in want.keys():
            assert_close(f"{name}: {k}", want[k], got[k], 1e-6)
        assert "L2 norm" in capsys.readouterr().out
    assert run("vectors", "negate", va_p, "--out", tmp_path / "neg.safetensors") == 2, "must refuse to overwrite"
    assert "exists" in capsys.readouterr().err

    merged = tmp_path / "merged"
    assert (
        run(
            "vectors",
            "apply",
            "--base",
            base,
            "--vector",
            va_p,
            "--vector",
            vb_p,
            "--coef",
            "0.5",
            "--coef",
            "0.5",
            "--out",
            merged,
            "--quiet",
            "--max-shard-gb",
            "0.0001",
        )
        == 0
    )
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(merged)
    want = copy.deepcopy(ckpts["base_model"])
    (0.5 * (va + vb)).apply_to(want, check_base="ignore")
    for (k, p), q in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
        assert_close(k, q, p, 1e-6)
    assert (merged / "tokenizer.json").exists() and (merged / "model.safetensors.index.json").exists()


def test_vectors_cli_errors_name_the_problem(ckpts, tmp_path, capsys):
    rc = run(
        "vectors",
        "extract",
        "--base",
        ckpts["base"],
        "--finetuned",
        ckpts["other"],
        "--out",
        tmp_path / "x.safetensors",
        "--quiet",
    )
    err = capsys.readouterr().err
    assert rc == 2 and "only in finetuned: model.layers.2" in err
    rc = run("vectors", "dare", tmp_path / "missing.safetensors", "--p", "0.1", "--out", tmp_path / "y.safetensors")
    assert rc == 2 and "missing.safetensors" in capsys.readouterr().err


def test_steer_cli_end_to_end(ckpts, tmp_path, capsys):
    model_dir = ckpts["ft_a"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        p = torch.randint(2, 63, (3,), generator=g).tolist()
        d, u = torch.randint(2, 63, (2,), generator=g).tolist()
        rows.append({"prompt": words(p), "desired": words([d]), "undesired": words([u])})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    sv_path = tmp_path / "sv.safetensors"
    assert (
        run(
            "steer",
            "extract",
            "--model",
            model_dir,
            "--pairs",
            pairs,
            "--layers",
            "0,1",
            "--method",
            "pca",
            "--out",
            sv_path,
            "--device",
            "cpu",
        )
        == 0
    )
    assert "norm" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want = extract_steering_vector(model, rows, method="pca", tokenizer=word_tokenizer())
    got = SteeringVector.load(sv_path)
    for layer in (0, 1):
        assert_close(f"layer {layer}", want.directions[layer], got.directions[layer], 1e-5)

    report = tmp_path / "verify.json"
    assert (
        run(
            "steer",
            "verify",
            "--model",
            model_dir,
            "--vector",
            sv_path,
            "--pairs",
            pairs,
            "--coef",
            "3",
            "--layers",
            "1",
            "--json",
            report,
            "--device",
            "cpu",
        )
        == 0
    )
    assert "projection on direction" in capsys.readouterr().out
    r = json.loads(report.read_text())
    assert r["n_pairs"] == 8 and r["layers"] == [1] and abs(r["margin_change"]) > 0

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in ["t5 t6 t7", [8, 9, 10, 11], {"text": "t12 t13"}]))
    out = tmp_path / "baked"
    assert (
        run(
            "steer",
            "bake",
            "--model",
            model_dir,
            "--vector",
            sv_path,
            "--prompts",
            prompts,
            "--coef",
            "3",
            "--steps",
            "3",
            "--lr",
            "1e-3",
            "--eval-pairs",
            pairs,
            "--out",
            out,
            "--quiet",
            "--device",
            "cpu",
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "KL closed" in text and "retained" in text
    baked = AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(p, q) for p, q in zip(baked.parameters(), model.parameters(), strict=True))
    assert (out / "tokenizer.json").exists()
    # a vector from a 2-layer model on a 3-layer model: clear error, exit code 2
    rc = run("steer", "verify", "--model", ckpts["other"], "--vector", sv_path, "--pairs", pairs, "--device", "cpu")
    assert rc == 2 and "2 layers, the model has 3" in capsys.readouterr().err
