"""Passkey retrieval (leanlm/longctx.py): prompt layout, reproducible trials, scoring, errors, and the CLI task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanlm.checkpoint import save_checkpoint
from leanlm.cli import main
from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.longctx import STYLES, build_prompt, draw_trials, load_filler, parse_settings, passkey, score
from leanlm.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fillers(tiny_tokenizer):
    return {style: load_filler(tiny_tokenizer, style, 4096) for style in STYLES}


def parts(tok, style: str, key: int) -> tuple[list[int], list[int], list[int]]:
    st = STYLES[style]
    return tok.encode(st.head), tok.encode(st.needle.format(key=key), add_bos=False), tok.encode(st.question, False)


@pytest.mark.parametrize("style, length", [("text", 300), ("text", 512), ("code", 120), ("code", 400)])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_length_and_needle_depth(tiny_tokenizer, fillers, style, length, depth):
    head, needle, question = parts(tiny_tokenizer, style, 48213)
    for offset in (0.0, 0.37, 1.0):
        p = build_prompt(tiny_tokenizer, fillers[style], length, depth, 48213, offset, style)
        assert math.ceil(0.9 * length) <= len(p.ids) <= length
        assert p.ids[: len(head)] == head and p.ids[-len(question) :] == question
        assert p.ids[p.needle_at : p.needle_at + len(needle)] == needle
        window = len(p.ids) - len(head) - len(needle) - len(question)  # filler tokens
        at = p.needle_at - len(head)  # filler tokens before the needle
        assert at == pytest.approx(depth * window, abs=length // 20 + 1) and p.depth == at / window
        if depth == 0:
            assert p.needle_at == len(head)
        if depth == 1:
            assert p.needle_at + len(needle) == len(p.ids) - len(question)


def test_prompt_capped_below_length_and_trials_differ(tiny_tokenizer, fillers):
    p = build_prompt(tiny_tokenizer, fillers["code"], 256, 0.5, 12345, 0.2, "code", max_tokens=246)
    assert math.ceil(0.9 * 256) <= len(p.ids) <= 246
    (k1, o1), (k2, o2) = draw_trials(0, 256, 2)
    p1, p2 = (build_prompt(tiny_tokenizer, fillers["text"], 300, 0.5, k, o) for k, o in ((k1, o1), (k2, o2)))
    assert p1.ids != p2.ids and p1.key == k1


def test_trials_are_reproducible_and_distinct():
    a = draw_trials(0, 1024, 30)
    assert a == draw_trials(0, 1024, 30) and a != draw_trials(1, 1024, 30)
    keys = [k for k, _ in a]
    assert len(set(keys)) == 30 and all(10_000 <= k <= 99_999 for k in keys)
    assert len({o for _, o in a}) == 30 and all(0 <= o < 1 for _, o in a)


@pytest.mark.parametrize(
    "text, correct, digits",
    [
        (" 48213. Remember it.", True, 1.0),
        (" 4 8 2 1 3", True, 1.0),
        ("48,213", True, 1.0),
        (" 482139", True, 1.0),  # only the first five digits count
        (" 48231", False, 0.6),
        (" 4821", False, 0.8),
        (" 1. 48213", False, 0.0),  # the first digits found are 14821
        ("no digits at all", False, 0.0),
        (" ٤٨٢١٣", False, 0.0),  # ASCII digits only
    ],
)
def test_score(text, correct, digits):
    assert score(text, 48213) == (correct, pytest.approx(digits))


def test_bad_settings_raise(tiny_tokenizer, tiny_model, fillers):
    cases = [
        dict(lengths=[300], depths=[0.5]),  # the tiny model's context is 256
        dict(lengths=[64], depths=[0.5]),  # too short for head + needle + question + filler
        dict(lengths=[250], depths=[1.5]),
        dict(lengths=[250], depths=[-0.1]),
        dict(lengths=[250], depths=[float("nan")]),
        dict(lengths=[250], depths=[0.5], trials=0),
        dict(lengths=[250], depths=[0.5], style="poem"),
        dict(lengths=[], depths=[0.5]),
    ]
    for kw in cases:
        with pytest.raises(LeanLMError) as e:
            passkey(tiny_model, tiny_tokenizer, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(LeanLMError, match="comma-separated"):
        parse_settings("1k", "0", 1, "text")
    with pytest.raises(LeanLMError, match="too short"):
        build_prompt(tiny_tokenizer, fillers["text"], 100, 0.5, 12345, 0.0)


def test_passkey_on_a_tiny_model(tiny_tokenizer, tiny_model):
    res = passkey(tiny_model, tiny_tokenizer, lengths=[256, 240], depths=[0, 1], trials=2, style="text")
    assert res["lengths"] == [256, 240] and res["depths"] == [0.0, 1.0]
    for table in (res["accuracy"], res["digit_accuracy"]):
        assert set(table) == {"256", "240"} and all(set(row) == {"0.0", "1.0"} for row in table.values())
        assert all(0 <= v <= 1 for row in table.values() for v in row.values())
    assert 0 <= res["mean_accuracy"] <= 1 and res["task"] == "passkey" and res["protocol"]


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=300, max_seq_len=512, eos_token_id=tiny_tokenizer.eos_id)
    return str(save_checkpoint(Transformer(cfg).init_weights(seed=0), tiny_tokenizer, tmp_path / "ck"))


def test_cli_passkey_json_and_table(capsys, ckpt):
    argv = ["eval", "-m", ckpt, "--task", "passkey", "--lengths", "300,512", "--depths", "0,0.5,1", "--trials", "2"]
    assert main([*argv, "--passkey-style", "code", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ok"] and res["style"] == "code" and res["trials"] == 2
    assert set(res["accuracy"]) == {"300", "512"} and set(res["accuracy"]["512"]) == {"0.0", "0.5", "1.0"}
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["length", "d=0.0", "d=0.5", "d=1.0"] and out[3].split()[0] == "300"
    assert out[4].split()[0] == "512" and len(out[4].split()) == 4


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--task", "passkey", "--depths", "1.5"], "depth 1.5 is outside [0, 1]"),
        (["--task", "passkey", "--lengths", "512,x"], "comma-separated"),
        (["--task", "passkey", "--lengths", "600"], "exceeds the model's context of 512"),
        (["--task", "passkey", "--trials", "0"], "trials must be at least 1"),
        (["--task", "passkey", "-d", "wikitext-2"], "--data is for --task ppl"),
        ([], "--task ppl needs --data"),
    ],
)
def test_cli_bad_values_one_line_exit_2(capsys, ckpt, extra, needle):
    assert main(["eval", "-m", ckpt, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leanlm: error:") and needle in err[0]
