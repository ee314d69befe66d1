"""Generation: cached decoding matches a full forward, batching matches batch 1, sampling filters, HF parity."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import decode_padded

from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.generate import TextStreamer, apply_repetition_penalty, generate, sample_next
from leanlm.hf import to_hf_state
from leanlm.model import Transformer

TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(preset("tiny")).init_weights(seed=0).eval()


def tokens(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def full_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0]  # (T, V), no caches


@torch.inference_mode()
def test_cached_decode_matches_full_forward(model):
    ids = tokens(20, seed=1)
    ref = full_logits(model, ids)
    model.setup_caches(1, len(ids))
    try:
        got = [model(torch.tensor([ids[:8]]))[0]]  # prefill 8 tokens
        for s in range(8, len(ids)):
            got.append(model(torch.tensor([[ids[s]]]), start=s)[0])
    finally:
        model.reset_caches()
    assert torch.allclose(torch.cat(got), ref, atol=TOL, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_matches_full_forward(model):
    ids = tokens(24, seed=2)
    ref = full_logits(model, ids)
    model.setup_caches(1, len(ids))
    try:
        a = model(torch.tensor([ids[:10]]))[0]
        b = model(torch.tensor([ids[10:]]), start=10)[0]
    finally:
        model.reset_caches()
    assert torch.allclose(torch.cat([a, b]), ref, atol=TOL, rtol=0)


@torch.inference_mode()
def test_padded_batch_logits_match_each_row_alone(model):
    prompts = [tokens(5, seed=3), tokens(12, seed=4), tokens(9, seed=5)]
    extra = [tokens(4, seed=10 + r) for r in range(3)]  # fed one by one after the prompt, as in decoding
    P = 12
    prefill, decoded = decode_padded(model, prompts, extra)  # (B, P, V), (B, 4, V)
    for r, p in enumerate(prompts):
        ref = full_logits(model, p + extra[r])
        assert torch.allclose(prefill[r, P - len(p) :], ref[: len(p)], atol=TOL, rtol=0)
        assert torch.allclose(decoded[r], ref[len(p) :], atol=TOL, rtol=0)


def test_batched_greedy_equals_batch_one(model):
    prompts = [tokens(3, seed=6), tokens(11, seed=7), tokens(7, seed=8)]
    batched = generate(model, prompts, max_new_tokens=12)
    for r, p in enumerate(prompts):
        assert batched.tokens[r] == generate(model, [p], max_new_tokens=12).tokens[0]
    assert model.caches is None
    assert batched.prompt_tokens == 21 and batched.n_decode_tokens == 3 * 11


def test_stop_token_and_streaming_callback(model):
    prompts = [tokens(6, seed=9), tokens(4, seed=9)]
    free = generate(model, prompts, max_new_tokens=10).tokens
    stop = free[0][3]
    seen: list[tuple[int, int]] = []
    res = generate(model, prompts, max_new_tokens=10, stop_ids=[stop], on_token=lambda r, t: seen.append((r, t)))
    assert res.tokens == [row[: row.index(stop)] if stop in row else row for row in free]
    assert len(res.tokens[0]) <= 3
    for r in range(2):  # the callback saw exactly the reported tokens, in order
        assert [t for row, t in seen if row == r] == res.tokens[r]


def test_repetition_penalty_matches_hf():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), ref)


def test_repetition_penalty_changes_greedy_output(model):
    prompt = tokens(8, seed=11)
    plain = generate(model, [prompt], max_new_tokens=60).tokens[0]
    assert len(set(plain)) < len(plain)  # the random model loops when left alone
    strong = generate(model, [prompt], max_new_tokens=60, repetition_penalty=1e6).tokens[0]
    assert len(set(strong)) == len(strong) and not set(strong) & set(prompt)  # nothing seen is ever picked again


def test_top_k_top_p_stay_in_allowed_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=g) * 3
    topk_allowed = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(5, dim=-1).indices, True)
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    nucleus_size = (probs.cumsum(-1) < 0.6).sum(-1) + 1  # smallest prefix holding >= 60% of the mass
    topp_allowed = torch.zeros_like(topk_allowed)
    for r in range(4):
        topp_allowed[r, order[r, : nucleus_size[r]]] = True
    for _ in range(200):
        t = sample_next(logits, 1.0, top_k=5, generator=g)
        assert topk_allowed.gather(1, t[:, None]).all()
        t = sample_next(logits, 1.0, top_p=0.6, generator=g)
        assert topp_allowed.gather(1, t[:, None]).all()
    # top_p so small that only the best token survives = greedy
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, 0.0, top_k=3, top_p=0.5), logits.argmax(-1))


def test_same_seed_same_tokens(model):
    prompts = [tokens(5, seed=12), tokens(8, seed=13)]
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, prompts, seed=123, **kw).tokens
    assert a == generate(model, prompts, seed=123, **kw).tokens
    assert a != generate(model, prompts, seed=124, **kw).tokens


def test_bad_inputs_raise(model):
    with pytest.raises(LeanLMError, match="exceeds the model's context of 256"):
        generate(model, [tokens(250, seed=14)], max_new_tokens=10)
    with pytest.raises(LeanLMError, match="empty prompt"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(LeanLMError, match="vocabulary"):
        generate(model, [[1, 512]], max_new_tokens=4)
    assert model.caches is None


def test_bf16_generates():
    m16 = Transformer(preset("tiny")).init_weights(seed=0).eval().to(torch.bfloat16)
    res = generate(m16, [tokens(4, seed=15), tokens(9, seed=16)], max_new_tokens=8, temperature=0.7, seed=0)
    assert [len(t) for t in res.tokens] == [8, 8]
    assert all(0 <= t < 512 for row in res.tokens for t in row)


class CharTokenizer:
    """Decodes ids as UTF-8 bytes, like a byte-level tokenizer, so a character can span several tokens."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_streamer_holds_back_partial_characters():
    out = io.StringIO()
    streamer = TextStreamer(CharTokenizer(), out)
    writes = []
    for b in "aé€".encode():
        streamer(0, b)
        streamer(1, 0x41)  # other rows are ignored
        writes.append(out.getvalue())
    streamer.end()
    assert writes == ["a", "a", "aé", "aé", "aé", "aé€"]
    assert out.getvalue() == "aé€\n"


def test_greedy_matches_hf_generate(model):
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_hf_state(model), strict=True)
    prompt = tokens(7, seed=17)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0]
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 7, dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.allclose(full_logits(model, prompt), ref, atol=TOL, rtol=0)
    assert generate(model, [prompt], max_new_tokens=16).tokens[0] == out[0, 7:].tolist()
