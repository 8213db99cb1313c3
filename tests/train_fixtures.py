"""Shared pieces of the `apollo-fast train` tests: a local tokenizer and model, synthetic data, the frozen API.

Nothing is downloaded: the tokenizer is a character-level WordLevel model built with `tokenizers`,
the model a tiny random one from apollo_fast.toy, both saved with save_pretrained into a folder.

`fallback_segment_loss` is an independent check of loss *values*: the full-sequence loss over
context + segment with the context positions' labels set to -100. Its loss equals the frozen loss;
its gradients do not (they flow into the context).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

IGNORE = -100
CHARS = string.ascii_lowercase + string.digits + " .,:;!?->=_()"


def one_thread():
    """Generator for a module-scoped autouse fixture: torch on one thread (tiny ops on 2 shared cores run
    ~10x faster without OpenMP contention), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer(bos: bool = False):
    """A character-level PreTrainedTokenizerFast (vocab < 64); with bos=True it prepends [BOS] like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, "[BOS]": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    extra = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", 3)]
        )
        extra["bos_token"] = "[BOS]"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", model_max_length=512, **extra
    )


def make_model_dir(root: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random model of `arch` plus the tokenizer, saved into root/arch; returns the folder."""
    from apollo_fast.toy import tiny_causal_lm

    path = Path(root) / arch
    layers = 4 if arch == "qwen3_5" else 2  # qwen3_5: 3 GDN layers + 1 attention layer
    tiny_causal_lm(arch=arch, layers=layers, seed=seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def copy_behaviour(n: int, seed: int = 0, segments: int = 2) -> list[dict]:
    """A learnable behaviour: the target repeats the context's first two characters."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    rows = []
    for _ in range(n):
        context = "".join(rng.choice(letters) for _ in range(rng.randint(8, 20)))
        segs = [{"prompt": " =" * (k + 1), "target": context[:2] + "."} for k in range(segments)]
        rows.append({"context": context, "segments": segs})
    return rows


def general_texts(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"text": " ".join(rng.choice(["ab", "cd", "ef", "gh"]) for _ in range(rng.randint(3, 12)))} for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fallback_encode_context(model, input_ids, attention_mask=None, **options):
    """Stand-in for apollo_fast.encode_context: the 'context' is its token ids (1, T)."""
    return input_ids.detach()


def fallback_segment_loss(model, context, input_ids, labels=None, attention_mask=None, **options):
    """Stand-in for apollo_fast.segment_loss: full-sequence loss on context + segment, context labels -100.

    Same value as the frozen loss (labels shifted inside the segment, so its first label is unused);
    NOT the same gradients, since here gradients also flow through the context's activations.
    attention_mask may only mark right padding, which causal attention and -100 labels make inert.
    """
    labels = input_ids if labels is None else labels
    labels = labels.clone()
    labels[:, 0] = IGNORE
    batch = input_ids.shape[0]
    ids = torch.cat([context.expand(batch, -1), input_ids], dim=1)
    full_labels = torch.cat([torch.full_like(context.expand(batch, -1), IGNORE), labels], dim=1)
    return model(input_ids=ids, labels=full_labels, use_cache=False).loss


def use_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer runs the fallback instead of the frozen core (to compare with full-sequence gradients)."""
    from apollo_fast.frozen import trainer

    monkeypatch.setattr(trainer, "encode_context", fallback_encode_context)
    monkeypatch.setattr(trainer, "segment_loss", fallback_segment_loss)


def backward_trainer(model, segment_batch: int = 8):
    """A FrozenContextTrainer for backward() calls only (its optimizer never steps in these tests)."""
    from apollo_fast import FrozenContextTrainer

    return FrozenContextTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=segment_batch)
