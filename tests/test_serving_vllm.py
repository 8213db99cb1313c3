"""apollo_fast.serving against a real in-process vLLM engine (the CPU build, fp32, eager).

One engine serves the whole module. Every test starts from the checkpoint's weights pushed as
version 0 through a fresh handle, and compares the engine's greedy tokens with transformers' on
the same weights, token for token.
"""

import math
import threading
import time

import pytest
import torch
from serving_fixtures import (
    ENGINE,
    PROMPTS,
    hf_greedy,
    load_model,
    perturb,
    save_model_dir,
    set_threads,
    shutdown,
    skip_without_vllm,
    vllm_process_state,
)

vllm = skip_without_vllm()

from apollo_fast.serving import BackgroundPusher, PushError, VerifyError, connect_vllm, start_vllm  # noqa: E402
from apollo_fast.serving.handle import greedy_reference  # noqa: E402
from apollo_fast.steering import SteeringVector, steer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def engine(model_dir):
    with vllm_process_state():
        llm = start_vllm(model_dir, **ENGINE)
        try:
            yield llm
        finally:
            shutdown(llm)


@pytest.fixture
def handle(engine, model_dir):
    h = connect_vllm(engine)
    h.push(load_model(model_dir), 0)  # the checkpoint's weights, whatever an earlier test pushed
    return h


def _engine_matches(handle, model, n=12):
    for p in PROMPTS:
        assert handle.greedy(p, n) == hf_greedy(model, p, n), f"prompt {p}"


def test_push_serves_the_trainer_weights(handle, model_dir):
    model = load_model(model_dir)
    _engine_matches(handle, model)
    before = [handle.greedy(p, 12) for p in PROMPTS]
    full = sum(t.numel() * 4 for t in model.state_dict().values())
    for version in (1, 2):
        perturb(model, seed=version)
        rec = handle.push(model, version, verify=True)
        assert (rec.version, rec.bytes, rec.partial, rec.verified) == (version, full, False, True)
        assert handle.version() == version  # as the engine reports it
        _engine_matches(handle, model)
    assert [handle.greedy(p, 12) for p in PROMPTS] != before  # the pushes changed what is served


def test_only_changed_groups_are_sent(handle, model_dir):
    model = load_model(model_dir)
    assert handle.push(model, 1).tensors == 0  # identical to version 0: only the label moves
    assert handle.version() == 1
    perturb(model, scale=0.3, seed=3, pattern="layers.1.mlp.")
    rec = handle.push(model, 2)
    assert rec.partial and rec.tensors == 3 and rec.bytes == 3 * 128 * 64 * 4  # gate, up, down of layer 1
    _engine_matches(handle, model)
    perturb(model, scale=0.3, seed=4, pattern="self_attn.q_proj")  # q of both layers: whole attention groups
    rec = handle.push(model, 3)
    assert rec.tensors == 8 and handle.version() == 3  # q, k, v, o of both layers (vLLM fuses q/k/v)
    _engine_matches(handle, model)


def test_failed_push_keeps_the_previous_version(handle, engine, model_dir, tmp_path):
    model = load_model(model_dir)
    perturb(model, seed=5)
    handle.push(model, 5)
    served = [handle.greedy(p, 12) for p in PROMPTS]

    bad = load_model(model_dir)
    perturb(bad, seed=6)
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[3, 4] = math.nan
    with pytest.raises(PushError, match=r"keeps its previous version.*layers\.0\.mlp\.up_proj\.weight: has inf/NaN"):
        handle.push(bad, 6)

    from serving_fixtures import tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), "intermediate_size": 96}))
    with pytest.raises(PushError, match=r"mlp\.up_proj\.weight: shape \(96, 64\), the engine's is \(128, 64\)"):
        handle.push(other, 7)

    garbage = tmp_path / "truncated.safetensors"
    garbage.write_bytes(b'\x40\x00\x00\x00\x00\x00\x00\x00{"a":')
    q = torch.zeros(64, 64)
    for request, why in [
        ({"path": str(garbage)}, "not a safetensors file"),
        ({"tensors": {"model.layers.7.mlp.up_proj.weight": q}}, "not in the engine's checkpoint"),
        ({"tensors": {"model.layers.0.self_attn.q_proj.weight": q}}, "self_attn is incomplete"),
    ]:
        reply = engine.collective_rpc("apollo_push", kwargs={"request": request})[0]
        assert why in reply["error"], reply
    assert handle.version() == 5
    assert [handle.greedy(p, 12) for p in PROMPTS] == served
    perturb(model, seed=8)  # and the engine still takes good pushes
    handle.push(model, 8, verify=True)
    _engine_matches(handle, model)


def test_verify_catches_an_engine_that_differs(handle, model_dir):
    model, other = load_model(model_dir), load_model(model_dir)
    perturb(model, seed=9)
    perturb(other, scale=0.5, seed=10)
    snap = handle.snapshot(model, 9, verify=True)
    snap.reference = greedy_reference(other, handle.probe, handle.verify_tokens)  # what `other` would say
    with pytest.raises(VerifyError, match="differ from the trainer model's"):
        handle.send(snap)


def test_pushes_land_between_steps_of_running_requests(handle, engine, model_dir):
    """Requests in flight keep going through three pushes; every token is labelled with the version
    that produced it, and each labelled span is that version's greedy continuation (its KV recomputed)."""
    weights = {0: load_model(model_dir)}
    params = vllm.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    results, threads = {}, torch.get_num_threads()

    def serve():  # vLLM-CPU's attention wants the OpenMP thread count the engine started with, in every thread
        set_threads(threads)
        results["out"] = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)

    worker = threading.Thread(target=serve)
    worker.start()
    deadline = time.monotonic() + 60
    while not engine.llm_engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.002)
    for version in (1, 2, 3):
        time.sleep(0.03)
        model = load_model(model_dir)
        perturb(model, scale=0.08, seed=100 + version)
        handle.push(model, version)
        weights[version] = model
    worker.join(120)
    assert not worker.is_alive()
    outs = results["out"]
    seen = set()
    for prompt, out in zip(PROMPTS, outs, strict=True):
        comp = out.outputs[0]
        assert len(comp.token_ids) == 120 and comp.finish_reason == "length"
        assert comp.weight_versions and comp.weight_versions[-1].end == 120
        tokens = list(comp.token_ids)
        for span in comp.weight_versions:
            v = 0 if span.version == "0" else int(span.version)
            seen.add(v)
            expect = hf_greedy(weights[v], prompt + tokens[: span.start], span.end - span.start)
            assert tokens[span.start : span.end] == expect, f"prompt {prompt}, version {v} span {span}"
    assert len(seen) >= 2, f"no push landed while the requests ran (versions seen: {seen})"


def test_steering_equals_transformers_and_clearing_restores(handle, engine, model_dir):
    model = load_model(model_dir)
    gen = torch.Generator().manual_seed(0)
    sv = SteeringVector({0: torch.randn(64, generator=gen), 1: torch.randn(64, generator=gen)}, 64, 2)
    logprob_params = vllm.SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, ignore_eos=True)

    def detailed():
        outs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], logprob_params, use_tqdm=False)
        return [
            (o.outputs[0].token_ids, [{k: v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs])
            for o in outs
        ]

    unsteered = detailed()
    changed = False
    for layers, coef in [([1], 0.6), ([0, 1], 0.3), (None, 0.5)]:
        assert handle.set_steering(sv, coef, layers) == (layers or [0, 1])
        for p in PROMPTS:
            with steer(model, sv, coef, layers):
                expect = hf_greedy(model, p, 12)
            got = handle.greedy(p, 12)
            assert got == expect, f"layers {layers} coef {coef} prompt {p}"
            changed |= got != hf_greedy(model, p, 12)
    assert changed, "the steering changed no output: raise the coefficients"
    perturb(model, seed=11)  # steering stays on through a push
    handle.push(model, 11)
    with steer(model, sv, 0.5):
        _engine_matches(handle, model)
    handle.clear_steering()
    handle.push(load_model(model_dir), 12)
    assert detailed() == unsteered  # tokens and log-probs, bit for bit


def test_background_pusher_follows_training(handle, model_dir):
    model = load_model(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    pusher = BackgroundPusher(handle, every=2, verify=True)
    statuses = []
    try:
        for step in range(1, 8):
            ids = torch.randint(0, 64, (4, 16), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            pusher.maybe_push(model, step)
            statuses.append(pusher.status())
        records = pusher.finish(model, 7)
        versions = [r.version for r in records]
        assert versions == sorted(set(versions)) and versions[-1] == 7 and len(versions) >= 2, versions
        assert all(r.verified and r.bytes > 0 and r.seconds > 0 for r in records)
        assert handle.version() == 7 and pusher.served_version == 7 and pusher.status() == "7"
        model.eval()
        _engine_matches(handle, model)

        with torch.no_grad():  # a diverged step: the background push fails, the trainer hears it
            model.lm_head.weight[0, 0] = math.inf
        assert pusher.maybe_push(model, 8)
        with pytest.raises(PushError, match="lm_head.weight: has inf/NaN"):
            pusher.wait()
        assert handle.version() == 7
    finally:
        pusher.close()
