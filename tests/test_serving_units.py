"""apollo_fast.serving pieces that need no engine: push groups, digests, the refusal table, input errors."""

import pytest
import torch

from apollo_fast.cli import main
from apollo_fast.serving import BackgroundPusher, connect_vllm, reload_refusal
from apollo_fast.serving.payload import group_of, incomplete_groups, tensor_digest


def test_push_groups_are_decoder_sub_blocks_or_modules():
    assert group_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn"
    assert group_of("model.layers.3.mlp.experts.7.down_proj.weight") == "model.layers.3.mlp"
    assert group_of("model.language_model.layers.0.linear_attn.A_log") == "model.language_model.layers.0.linear_attn"
    assert group_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert group_of("lm_head.weight") == "lm_head"
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"]
    assert incomplete_groups(names[:1], names) == {"model.layers.0.self_attn": [names[1]]}
    assert incomplete_groups(names[:2], names) == {}


def test_digest_sees_equal_updates_of_equal_elements():
    w = torch.ones(1000)
    d0 = tensor_digest(w)
    u = w.clone()
    u[[3, 700]] -= 1e-3  # Adam's first step on a norm weight: equal elements, equal updates (a xor sum cancels)
    v = w.clone()
    v[3] += 2**-20
    v[4] -= 2**-20  # +/- one ulp pattern (a plain sum of the bits can cancel)
    assert len({int(d0), int(tensor_digest(u)), int(tensor_digest(v))}) == 3
    assert int(tensor_digest(w.clone())) == int(d0)
    assert int(tensor_digest(w.to(torch.bfloat16))) != int(d0)
    big = torch.randn(3 * (1 << 22) + 5)  # several chunks
    b2 = big.clone()
    b2[-1] += 1
    assert int(tensor_digest(big)) != int(tensor_digest(b2))


def test_refusal_table():
    why = reload_refusal("qwen3_next", "cpu", True)
    assert "qwen3_next" in why and "MoE" in why and "fresh engine" in why
    assert reload_refusal("qwen3_next", "cuda", True) is None
    assert reload_refusal("llama", "cpu", False) is None


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not a server URL"):
        connect_vllm("localhost:8000")
    with pytest.raises(ValueError, match="at least 1 optimizer step"):
        BackgroundPusher(None, 0)


def test_steer_serve_rejects_bad_input(tmp_path, capsys):
    from serving_fixtures import save_model_dir

    from apollo_fast.steering import SteeringVector

    model = save_model_dir(tmp_path)
    assert main(["steer", "serve", "--model", str(tmp_path / "nope"), "--vector", "x", "--coef", "1"]) == 2
    assert "--model: no model folder" in capsys.readouterr().err
    assert main(["steer", "serve", "--model", str(model), "--vector", str(tmp_path / "x"), "--coef", "1"]) == 2
    assert "--vector: no such file" in capsys.readouterr().err
    SteeringVector({0: torch.ones(32)}, 32, 2).save(tmp_path / "sv.safetensors")
    assert (
        main(["steer", "serve", "--model", str(model), "--vector", str(tmp_path / "sv.safetensors"), "--coef", "1"])
        == 2
    )
    assert "hidden size 32 and 2 layers" in capsys.readouterr().err
    SteeringVector({0: torch.ones(64)}, 64, 2).save(tmp_path / "sv64.safetensors")
    assert (
        main(
            [
                "steer",
                "serve",
                "--model",
                str(model),
                "--vector",
                str(tmp_path / "sv64.safetensors"),
                "--coef",
                "1",
                "--layers",
                "1",
            ]
        )
        == 2
    )
    assert "no direction for layers [1]" in capsys.readouterr().err
