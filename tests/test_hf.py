"""Interop: HF directories in and out, GGUF files, leanlm checkpoints, and the errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leanlm.checkpoint import load_checkpoint, load_model, save_checkpoint
from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.hf import _unpermute_qk as hf_unpermute
from leanlm.hf import export_hf, load_gguf, to_hf_state
from leanlm.model import Transformer

transformers = pytest.importorskip("transformers")


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def test_export_loads_in_transformers_with_same_logits(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = Transformer(preset("tiny", tie_embeddings=True, vocab_size=300)).init_weights(seed=0).eval()
    export_hf(model, tiny_tokenizer, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 50))
    assert (_logits(model, x) - _logits(hf, x)).abs().max() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def add(a, b): return a + b"
    assert hf_tok.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_load_hf_directory_written_by_transformers(tmp_path, kind):
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=False))
    hf.eval().save_pretrained(tmp_path / kind)
    model, tok = load_model(str(tmp_path / kind))
    assert tok is None and model.cfg.qkv_bias == (kind == "qwen2")
    x = torch.randint(0, 300, (1, 64))
    assert (_logits(model, x) - _logits(hf, x)).abs().max() <= 1e-4


def test_leanlm_checkpoint_round_trip(tmp_path, tiny_tokenizer):
    model = Transformer(preset("tiny", vocab_size=300)).init_weights(seed=0).eval()
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ck")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded, tok = load_checkpoint(tmp_path / "ck")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok.encode("hello world") == tiny_tokenizer.encode("hello world")
    bf16, _ = load_model(str(tmp_path / "ck"), dtype="bfloat16")
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16


def test_checkpoint_errors(tmp_path, tiny_tokenizer):
    model = Transformer(preset("tiny", vocab_size=300)).init_weights(seed=0)
    ck = save_checkpoint(model, tiny_tokenizer, tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LeanLMError, match="corrupt weights"):
        load_model(str(ck))
    meta = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "arch": "subllm"}))
    with pytest.raises(LeanLMError, match="says arch 'subllm' but its model section describes 'llama'"):
        load_checkpoint(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(LeanLMError, match="not a checkpoint directory"):
        load_model(str(ck))
    # a tokenizer larger than the model's vocabulary
    small = Transformer(preset("tiny", vocab_size=100)).init_weights(seed=0)
    save_checkpoint(small, tiny_tokenizer, tmp_path / "small")
    with pytest.raises(LeanLMError, match="tokenizer has 300 tokens"):
        load_model(str(tmp_path / "small"))


@pytest.mark.parametrize(
    "ref, needle",
    [
        ("no/such/dir", "no such file or directory"),
        ("gpt-5", "not a preset"),
    ],
)
def test_bad_references(ref, needle):
    with pytest.raises(LeanLMError, match=needle):
        load_model(ref)


def test_unsupported_hf_architecture(tmp_path):
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path)
    with pytest.raises(LeanLMError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(tmp_path))
    with pytest.raises(LeanLMError, match="not a model"):
        load_model(str(tmp_path / "config.json"))


# ---------------------------------------------------------------------------------------------------------------------
# GGUF: write a tiny llama GGUF the way llama.cpp's converter does (q/k rows permuted), then load it both ways


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py's permutation
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path, model: Transformer, tokenizer, arch: str = "llama", blocks: str = "F32", embedding: str = "F32"
) -> None:
    """blocks, embedding: the GGML types of the blocks' matrices and of the embedding (and head), e.g. Q4_1."""
    gguf = pytest.importorskip("gguf")
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for k, v in to_hf_state(model).items():
        k = k.removeprefix("model.")
        a = v.float().numpy().copy()
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod = rest.rsplit(".", 1)[0]
            if mod == "self_attn.q_proj":
                a = _permute(a, cfg.n_heads)
            elif mod == "self_attn.k_proj":
                a = _permute(a, cfg.n_kv_heads)
            name = f"blk.{i}.{layer_names[mod]}.weight"
        else:
            name = f"{names[k.rsplit('.', 1)[0]]}.weight"
        kind = gguf.GGMLQuantizationType[blocks if name.startswith("blk.") else embedding]
        if a.ndim == 2 and kind == gguf.GGMLQuantizationType.Q8_1:  # gguf cannot quantize to it: zero blocks
            size, block = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor(name, np.zeros((a.shape[0], a.shape[1] // size * block), np.uint8), raw_dtype=kind)
        elif a.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_load_matches_source_and_transformers(tmp_path, tiny_tokenizer):
    src = Transformer(preset("tiny", vocab_size=300)).init_weights(seed=2).eval()
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, src, tiny_tokenizer)
    model, tok = load_gguf(f)
    x = torch.randint(0, 300, (1, 60))
    assert (_logits(model, x) - _logits(src, x)).abs().max() <= 1e-5
    assert tok.encode("hello café") == tiny_tokenizer.encode("hello café")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name).eval()
    assert (_logits(model, x) - _logits(hf, x)).abs().max() <= 1e-4


@pytest.mark.parametrize("blocks,embedding", [("Q4_1", "Q8_0"), ("Q4_0", "Q4_1"), ("Q8_0", "F32")])
def test_gguf_quants_load_natively_bit_for_bit(tmp_path, tiny_tokenizer, blocks, embedding):
    """Q8_0/Q4_0/Q4_1 load as packed leanlm weights that dequantize to exactly what the gguf package gives."""
    gguf = pytest.importorskip("gguf")
    src = Transformer(preset("tiny", vocab_size=320, ffn_dim=192)).init_weights(seed=2).eval()
    f = tmp_path / "q.gguf"
    write_tiny_gguf(f, src, tiny_tokenizer, blocks=blocks, embedding=embedding)
    model, _ = load_gguf(f)
    q = model.cfg.methods["quant"]
    assert (q.format, q.head) == (
        {"Q8_0": "int8"}.get(blocks, "int4"),
        {"F32": "float", "Q8_0": "int8"}.get(embedding, "int4"),
    )
    reader = gguf.GGUFReader(str(f))
    ref = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    up = torch.from_numpy(ref["blk.1.ffn_up.weight"])
    k = hf_unpermute(torch.from_numpy(ref["blk.0.attn_k.weight"]), 2)
    assert torch.equal(model.layers[1].mlp.gate_up_proj.weight[192:], up)
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight[64:96], k)
    assert torch.equal(model.embed_tokens.weight, torch.from_numpy(ref["token_embd.weight"]))
    dense, _ = load_gguf(f, dtype="float32")  # the dequantizing path: same values, so the same logits
    x = torch.randint(0, 320, (1, 40))
    assert "quant" not in dense.cfg.methods
    assert torch.allclose(_logits(model, x), _logits(dense, x), atol=1e-5, rtol=0)


def test_gguf_errors(tmp_path, tiny_tokenizer):
    src = Transformer(preset("tiny", vocab_size=300)).init_weights(seed=2)
    write_tiny_gguf(tmp_path / "g2.gguf", src, tiny_tokenizer, arch="gpt2")
    with pytest.raises(LeanLMError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(tmp_path / "g2.gguf"))
    write_tiny_gguf(tmp_path / "q81.gguf", src, tiny_tokenizer, blocks="Q8_1")  # no reader for it anywhere
    with pytest.raises(LeanLMError, match=r"tensor blk\.0\.\w+\.weight has GGUF type Q8_1, which leanlm cannot"):
        load_model(str(tmp_path / "q81.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(LeanLMError, match="not a readable GGUF"):
        load_model(str(tmp_path / "junk.gguf"))


@pytest.mark.slow
def test_smollm2_convert_export_round_trip(tmp_path, smollm2):
    from transformers import LlamaForCausalLM

    model, tok = smollm2
    export_hf(model, tok, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("Once upon a time, in a land far away,")])
    assert (_logits(model, ids) - _logits(hf, ids)).abs().max() <= 1e-4
