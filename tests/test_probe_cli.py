"""`apollo-fast probe ...` from the command line: each probe end to end on tiny local models and text files,
and every kind of bad input refused with exit code 2 and one message naming it (no traceback)."""

from __future__ import annotations

import json

import pytest
from train_fixtures import copy_behaviour, general_texts, make_model_dir, one_thread, write_jsonl

from apollo_fast.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cli")
    paths = {arch: make_model_dir(root, arch) for arch in ("llama", "qwen3_5")}
    paths["train"] = write_jsonl(root / "train.jsonl", copy_behaviour(16))
    pairs = [
        {"prompt": r["context"] + " =", "desired": r["context"][:2] + ".", "undesired": "zz."}
        for r in copy_behaviour(12, seed=9)
    ]
    paths["pairs"] = write_jsonl(root / "pairs.jsonl", pairs)
    paths["general"] = write_jsonl(root / "general.jsonl", general_texts(12))
    paths["contexts"] = write_jsonl(root / "contexts.jsonl", [{"text": r["context"]} for r in copy_behaviour(10, 3)])
    return paths


def strict_json(path):
    def no_constants(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dose_and_lr_commands(files, tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "probe",
        "dose",
        "--model",
        files["llama"],
        "--train",
        files["train"],
        "--pairs",
        files["pairs"],
        "--n",
        "2,4",
        "--seeds",
        "2",
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--quiet",
        "--out",
        tmp_path / "dose",
        "--json",
        tmp_path / "dose.json",
        "--n-boot",
        "300",
    )
    assert code == 0 and "apollo-fast probe dose" in out and "null: n=4" in out
    assert {p.name for p in (tmp_path / "dose").iterdir()} == {"report.md", "report.json", "dose.png"}
    data = strict_json(tmp_path / "dose.json")
    assert [p["n"] for p in data["points"]] == [2, 4] and data["settings"]["steps"] == 2
    assert (tmp_path / "dose.json").stat().st_mode & 0o044  # readable by others under the usual umask
    code, out, _ = run(
        capsys,
        "probe",
        "lr",
        "--model",
        files["llama"],
        "--train",
        files["train"],
        "--pairs",
        files["pairs"],
        "--lrs",
        "1e-4",
        "1e-3",
        "--n",
        "4",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--general",
        files["general"],
        "--quiet",
        "--json",
        tmp_path / "lr.json",
        "--n-boot",
        "300",
    )
    assert code == 0
    data = strict_json(tmp_path / "lr.json")
    assert [p["lr"] for p in data["points"]] == [1e-4, 1e-3] and "damage_ci" in data["points"][0]


def test_gdn_state_steering_transfer_commands(files, tmp_path, capsys):
    q = files["qwen3_5"]
    assert (
        main(
            [
                "steer",
                "extract",
                "--model",
                str(q),
                "--pairs",
                str(files["pairs"]),
                "--out",
                str(tmp_path / "sv.safetensors"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, out, _ = run(
        capsys,
        "probe",
        "gdn-state",
        q,
        q,
        "--contexts",
        files["contexts"],
        "--vector",
        tmp_path / "sv.safetensors",
        "--quiet",
        "--out",
        tmp_path / "gdn",
        "--n-boot",
        "300",
    )
    assert code == 0 and "gdn-state" in out
    data = strict_json(tmp_path / "gdn" / "report.json")
    assert [r["kind"] for r in data["layers"]] == ["gdn", "gdn", "gdn", "attention"]
    assert all(r["rel_change"] == 0.0 and r["alignment"] == 0.0 for r in data["layers"])
    assert set(data["layers"][0]) >= {"layer", "kind", "rel_change", "cosine", "alignment", "baseline"}

    code, out, _ = run(
        capsys,
        "probe",
        "steering",
        "--model",
        files["llama"],
        f"copy={files['pairs']}",
        files["pairs"],
        "--folds",
        "2",
        "--n-perm",
        "20",
        "--coefs",
        "1",
        "--quiet",
        "--json",
        tmp_path / "steer.json",
        "--n-boot",
        "300",
    )
    assert code == 0
    data = strict_json(tmp_path / "steer.json")
    assert [b["name"] for b in data["behaviours"]] == ["copy", "pairs"]

    code, out, _ = run(
        capsys,
        "probe",
        "transfer",
        files["llama"],
        files["llama"],
        "--eval",
        f"p={files['pairs']}",
        f"g={files['general']}",
        "--quiet",
        "--json",
        tmp_path / "t.json",
        "--n-boot",
        "300",
    )
    assert code == 0
    sets = strict_json(tmp_path / "t.json")["sets"]
    assert [(s["name"], s["kind"], s["delta"], s["verdict"]) for s in sets] == [
        ("p", "pairs", 0.0, "no effect"),
        ("g", "text", 0.0, "no effect"),
    ]


def _bad(tmp_path, name, rows):
    return write_jsonl(tmp_path / name, rows)


def test_bad_input_exits_2_with_a_named_error(files, tmp_path, capsys):
    pairs = json.loads(files["pairs"].read_text().splitlines()[0])
    no_undesired = _bad(tmp_path, "no_u.jsonl", [pairs, {"prompt": "ab", "desired": "c"}] + [pairs] * 10)
    short = _bad(tmp_path, "short.jsonl", [pairs] * 3)
    empty = _bad(tmp_path, "empty.jsonl", [])
    same = _bad(tmp_path, "same.jsonl", [{"prompt": "ab", "desired": "xy", "undesired": "xy"}] * 12)
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text(json.dumps(pairs) + "\n{prompt: ab}\n")
    llama = files["llama"]
    cases = [
        (["probe", "steering", "--model", llama, no_undesired], f"{no_undesired}:2: pair without undesired"),
        (["probe", "steering", "--model", llama, short], "has 3 items, too few for a confidence interval"),
        (["probe", "steering", "--model", llama, empty], "is empty: no evaluation items"),
        (["probe", "steering", "--model", llama, same], "identical or one is a prefix"),
        (["probe", "steering", "--model", llama, not_json], f"{not_json}:2: invalid JSON"),
        (["probe", "transfer", llama, llama, "--eval", f"e={empty}"], "is empty"),
        (
            ["probe", "transfer", llama, llama, "--eval", f"g={files['general']}", f"g={files['general']}"],
            "given twice",
        ),
        (
            ["probe", "dose", "--model", llama, "--train", files["train"], "--pairs", files["pairs"], "--n", "0,4"],
            "--n",
        ),
        (
            ["probe", "dose", "--model", llama, "--train", files["train"], "--pairs", files["pairs"], "--n", "99"],
            "out of range",
        ),
        (
            ["probe", "dose", "--model", llama, "--train", files["train"], "--pairs", files["pairs"], "--lr", "nan"],
            "lr must be a finite number",
        ),
        (
            ["probe", "lr", "--model", llama, "--train", files["train"], "--pairs", files["pairs"], "--lrs", "1e-3,x"],
            "--lrs",
        ),
        (
            ["probe", "gdn-state", llama, llama, "--contexts", _bad(tmp_path, "c.jsonl", [{"text": "a"}] * 12)],
            "a context needs at least 2 tokens",
        ),
        (
            ["probe", "gdn-state", llama, tmp_path / "nowhere", "--contexts", files["contexts"]],
            "not a transformers model folder",
        ),
        (["probe", "steering", "--model", llama, files["pairs"], "--level", "1.5"], "level"),
        (
            ["probe", "gdn-state", llama, llama, "--contexts", files["contexts"], "--vector", files["pairs"]],
            "not an apollo_fast steering vector",
        ),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, (message, err)
        assert err.count("\n") == 1, err  # one message


def test_unsupported_model_is_refused(tmp_path, files, capsys):
    from train_fixtures import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    code, _, err = run(capsys, "probe", "steering", "--model", path, files["pairs"])
    assert code == 2 and "model class GPT2LMHeadModel is not supported" in err


def test_existing_outputs_are_refused_before_any_work(files, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "r.json").write_text("{}")
    for extra in (["--out", tmp_path / "out"], ["--json", tmp_path / "r.json"]):
        code, _, err = run(
            capsys,
            "probe",
            "transfer",
            tmp_path / "no-model",
            tmp_path / "no-model",
            "--eval",
            f"g={files['general']}",
            *extra,
        )
        assert code == 2 and "pass --overwrite" in err  # refused before the (missing) model is looked at
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and (tmp_path / "r.json").read_text() == "{}"
