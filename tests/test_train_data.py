"""`apollo-fast train` data: validation errors name file and line; tokenisation puts labels where they belong."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import IGNORE, make_tokenizer, one_thread, write_jsonl

from apollo_fast.training.data import DataError, GeneralItem, Limits, fingerprint, load_behaviour, load_general

GOOD = {"context": "abc", "segments": [{"prompt": " q", "target": "ok"}]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# (line written to the file, expected fragment of the message)
BAD_BEHAVIOUR = [
    ('{"context": "abc", "segments": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"segments": [{"prompt": "", "target": "x"}]}', 'missing field "context"'),
    ('{"context": 5, "segments": [{"prompt": "", "target": "x"}]}', '"context" must be a string, got int'),
    ('{"context": "abc"}', 'missing field "segments"'),
    ('{"context": "abc", "segments": {"prompt": "", "target": "x"}}', '"segments" must be a list, got dict'),
    ('{"context": "abc", "segments": []}', '"segments" is empty'),
    ('{"context": "abc", "segments": ["x"]}', "segments[0] must be an object, got str"),
    ('{"context": "abc", "segments": [{"target": "x"}]}', 'segments[0]: missing field "prompt"'),
    ('{"context": "abc", "segments": [{"prompt": "a", "target": "b"}, {"prompt": "a"}]}', 'segments[1]: missing field "target"'),  # noqa: E501
    ('{"context": "abc", "segments": [{"prompt": "a", "target": 3}]}', 'segments[0]: "target" must be a string, got int'),  # noqa: E501
    ('{"context": "abc", "segments": [{"prompt": "a", "target": ""}]}', 'segments[0]: "target" is empty'),
    ('{"context": "", "segments": [{"prompt": "a", "target": "b"}]}', '"context" is empty'),
    ('{"context": "a", "segments": [{"prompt": "", "target": "b"}]}', "context needs at least 2 tokens"),
    (json.dumps({"context": "x" * 30, "segments": [{"prompt": "ab", "target": "cd"}]}), "max_position_embeddings (32)"),
]  # fmt: skip


@pytest.mark.parametrize("line,expected", BAD_BEHAVIOUR, ids=[e for _, e in BAD_BEHAVIOUR])
def test_bad_behaviour_line_is_reported_with_file_and_line(tmp_path, tok, line, expected):
    path = write_jsonl(tmp_path / "b.jsonl", [GOOD, "", line, GOOD])  # the bad line is line 3 (line 2 blank)
    with pytest.raises(DataError) as err:
        load_behaviour(path, tok, Limits(max_positions=32))
    msg = str(err.value)
    assert f"{path}:3: " in msg, msg
    assert expected in msg, msg
    assert "1 problem " in msg and f"{path}:1:" not in msg and f"{path}:4:" not in msg, msg


def test_invalid_utf8_and_every_bad_line_listed(tmp_path, tok):
    path = tmp_path / "b.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n" + b"{oops\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError) as err:
        load_behaviour(path, tok)
    msg = str(err.value)
    assert "2 problems" in msg and f"{path}:2: not valid UTF-8" in msg and f"{path}:3: invalid JSON" in msg, msg


def test_many_bad_lines_are_capped_but_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "b.jsonl", ["nope"] * 30)
    with pytest.raises(DataError) as err:
        load_behaviour(path, tok)
    msg = str(err.value)
    assert "30 problems" in msg and "... and 10 more" in msg and f"{path}:20:" in msg and f"{path}:21:" not in msg


def test_length_limits_and_empty_file(tmp_path, tok):
    long_ctx = write_jsonl(tmp_path / "c.jsonl", [{"context": "abcdef", "segments": [{"prompt": "a", "target": "bc"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: context has 6 tokens, more than the limit 5"):
        load_behaviour(long_ctx, tok, Limits(max_context_tokens=5))
    with pytest.raises(DataError, match=r"c\.jsonl:1: segments\[0\] has 3 tokens, more than the limit 2"):
        load_behaviour(long_ctx, tok, Limits(max_segment_tokens=2))
    with pytest.raises(ValueError, match="max_segment_tokens must be an integer >= 2"):
        load_behaviour(long_ctx, tok, Limits(max_segment_tokens=1))
    empty = write_jsonl(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no examples"):
        load_behaviour(empty, tok)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_behaviour(tmp_path / "missing.jsonl", tok)


def test_tokenisation_labels_only_on_targets(tmp_path, tok):
    row = {
        "context": "hello",
        "id": 7,
        "segments": [{"prompt": " q:", "target": "ab"}, {"prompt": " r", "target": "xyz"}],
    }
    (ex,) = load_behaviour(write_jsonl(tmp_path / "b.jsonl", [row]), tok)
    assert ex.line == 1 and ex.context_ids.tolist() == ids(tok, "hello")
    s0, s1 = ex.segments
    assert s0.input_ids.tolist() == ids(tok, " q:ab")
    assert s0.labels.tolist() == [IGNORE] * 3 + ids(tok, "ab") and s0.n_target == 2
    assert s1.labels.tolist() == [IGNORE] * 2 + ids(tok, "xyz") and s1.n_target == 3
    assert ex.n_target == 5 and ex.n_tokens == 5 + 5 + 5


def test_empty_prompt_moves_last_context_token_into_every_segment(tmp_path, tok):
    """The segment's first token is never a target, so the context's last token predicts the target's first."""
    row = {"context": "hello", "segments": [{"prompt": "", "target": "ab"}, {"prompt": "q", "target": "c"}]}
    (ex,) = load_behaviour(write_jsonl(tmp_path / "b.jsonl", [row]), tok)
    assert ex.context_ids.tolist() == ids(tok, "hell")
    assert ex.segments[0].input_ids.tolist() == ids(tok, "oab")
    assert ex.segments[0].labels.tolist() == [IGNORE] + ids(tok, "ab")
    assert ex.segments[1].input_ids.tolist() == ids(tok, "oqc")
    assert ex.segments[1].labels.tolist() == [IGNORE, IGNORE] + ids(tok, "c")


def test_bos_and_target_eos(tmp_path):
    tok = make_tokenizer(bos=True)
    path = write_jsonl(tmp_path / "b.jsonl", [GOOD])
    (ex,) = load_behaviour(path, tok, Limits(target_eos=True))
    assert ex.context_ids.tolist() == [tok.bos_token_id] + ids(tok, "abc")
    assert ex.segments[0].input_ids.tolist() == ids(tok, " qok") + [tok.eos_token_id]
    assert ex.segments[0].labels.tolist()[-1] == tok.eos_token_id and ex.segments[0].n_target == 3


def test_general_text_chunks_cover_every_target_once(tmp_path, tok):
    text = "the quick brown fox jumps"
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": text}, {"text": "ab"}, GOOD])
    items = load_general(path, tok, Limits(general_chunk_tokens=7))
    chunks = [it for it in items if isinstance(it, GeneralItem) and it.line == 1]
    full = ids(tok, text)
    assert all(2 <= c.n_tokens <= 7 for c in chunks)
    assert [t for c in chunks for t in c.input_ids.tolist()[1:]] == full[1:], "each token after the first: once"
    assert chunks[0].input_ids.tolist()[0] == full[0]
    assert [it.line for it in items if it.line != 1] == [2, 3] and not isinstance(items[-1], GeneralItem)


BAD_GENERAL = [
    ('{"text": 3}', '"text" must be a string, got int'),
    ('{"text": "a"}', "tokenises to 1 token(s)"),
    ('{"text": "ab", "context": "x", "segments": []}', "not both"),
    ('{"body": "ab"}', 'missing field "text"'),
    ('{"context": "ab", "segments": [{"prompt": "a"}]}', 'segments[0]: missing field "target"'),
]


@pytest.mark.parametrize("line,expected", BAD_GENERAL, ids=[e for _, e in BAD_GENERAL])
def test_bad_general_line_is_reported(tmp_path, tok, line, expected):
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError) as err:
        load_general(path, tok)
    assert f"{path}:2: " in str(err.value) and expected in str(err.value), str(err.value)


def test_fingerprint_tracks_tokens(tmp_path, tok):
    a = load_behaviour(write_jsonl(tmp_path / "a.jsonl", [GOOD]), tok)
    b = load_behaviour(write_jsonl(tmp_path / "b.jsonl", [GOOD]), tok)
    c = load_behaviour(write_jsonl(tmp_path / "c.jsonl", [{**GOOD, "context": "abd"}]), tok)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert fingerprint(a, []) != fingerprint([], a)
    assert torch.equal(a[0].context_ids, b[0].context_ids)
