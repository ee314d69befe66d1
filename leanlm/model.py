"""The dense LLaMA baseline, all of it in this one file: its config, its blocks, and the hooks methods plug into.

Math and parameter names follow Hugging Face `LlamaForCausalLM` (half-split RoPE with fp32 angles, RMSNorm in fp32,
SwiGLU), except that q/k/v and gate/up are fused into one projection each (`qkv_proj`, `gate_up_proj`) because that is
measurably faster; hf.py maps HF state dicts in and out, and logits agree with HF to float rounding.

Efficiency methods (leanlm/methods/) change the model through three hooks only, never by patching `forward`:
- an FFN factory: `Transformer(cfg, ffn=...)` builds each block's FFN (LTE's experts); an FFN is an `MLP` subclass;
- an attention factory: `Transformer(cfg, attn=...)` builds a block's attention (sparse patterns), an `Attention`;
- a token router: `model.router` decides which tokens each block sees (SUBLLM's stages, random-LTD's drops). The
  forward below is the only layer loop: it calls the router before and after every block (`TokenRouter`).

    from leanlm.config import preset
    from leanlm.model import Transformer
    model = Transformer(preset("tiny")).init_weights(seed=0)
    logits = model(torch.randint(0, 512, (2, 16)))   # (B, T, vocab)

Shapes: B batch, T new tokens, S keys attended (cache length), H query heads, K kv heads, D head dim, C model width,
F FFN width, L layers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.errors import LeanLMError
from leanlm.quant import Packed

DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("linear", "llama3")
PASSES = ("train", "prefill", "decode")  # what `Transformer.flops` counts


@dataclass
class ModelConfig:
    """A LLaMA-family decoder: pre-norm blocks of grouped-query attention + SwiGLU, RoPE, RMSNorm.

    `methods` holds the config of each efficiency method that changes the architecture, by name (leanlm.methods);
    empty = the dense baseline. leanlm.config reads and writes the whole thing as one flat mapping.
    """

    vocab_size: int = 32000
    dim: int = 2048  # residual width
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    head_dim: int | None = None  # None = dim // n_heads
    ffn_dim: int = 5504  # SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (HF's rope_scaling dict)
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    max_seq_len: int = 2048  # longest context the model accepts (RoPE tables and KV caches are sized by it)
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> its config dataclass

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even for RoPE")
        if not (0 < self.norm_eps < 1):
            raise bad("norm_eps", "must be in (0, 1)")
        if not self.rope_theta > 0:
            raise bad("rope_theta", "must be positive")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {', '.join(DTYPES)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise bad("rope_scaling", f"type must be one of {', '.join(ROPE_SCALING_TYPES)}")
            if not float(self.rope_scaling.get("factor", 0)) > 0:
                raise bad("rope_scaling", "needs a positive 'factor'")
            if kind == "llama3":
                need = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                missing = [k for k in need if k not in self.rope_scaling]
                if missing:
                    raise bad("rope_scaling", f"llama3 scaling needs {', '.join(missing)}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                raise bad(name, f"must be in [0, vocab_size={self.vocab_size})")
        for section in self.methods.values():
            section.check(self)  # every method config checks itself against the backbone (leanlm.methods)

    @property
    def arch(self) -> str:
        """'llama' for the dense baseline, else its methods, e.g. 'subllm' or 'subllm+lte' (stored in checkpoints)."""
        return "+".join(self.methods) or "llama"

    def to_dict(self) -> dict:
        """One flat mapping, each method's section under its name (config.json, config.yaml)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "methods"}
        return {**out, **{name: dataclasses.asdict(section) for name, section in self.methods.items()}}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def backbone(self) -> ModelConfig:
        """The dense baseline under the methods, in float32: what converting between methods must keep."""
        return self.replace(dtype="float32", methods={})


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused kernel, 2.5x faster in decode
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32 and multiply by the weight after casting back, exactly like HF's LlamaRMSNorm
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies (D/2,) in fp32, with HF's linear or llama3 scaling applied."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    kind = sc.get("type", sc.get("rope_type"))
    factor = float(sc["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_seq_len, computed once in fp32 (HF half-split convention).

    The sin table is stored with the rotation's sign folded in, [-sin, sin] over the two halves, so that applying
    RoPE needs one `roll` instead of rotate_half's chunk, neg and cat (apply_rope; bit-identical to HF's formula).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset()

    def reset(self, device: torch.device | None = None) -> None:
        inv_freq = rope_inv_freq(self.cfg).to(device)
        t = torch.arange(self.cfg.max_seq_len, device=device).float()
        freqs = torch.outer(t, inv_freq)  # (L, D/2)
        self.cos = torch.cat((freqs, freqs), dim=-1).cos()  # (L, D)
        self.sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (L, D), signed: see the class docstring

    def forward(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # pos: (B or 1, T) absolute positions -> cos, signed sin: (B or 1, 1, T, D), broadcast over heads
        return self.cos[pos].unsqueeze(1).to(dtype), self.sin[pos].unsqueeze(1).to(dtype)

    def at(self, start: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, signed sin (1, D) of position `start` for one token, broadcast over batch and heads: views of the
        tables (a decode step pays ~0.1 ms for a gather and its positions tensor, docs/design.md)."""
        cos, sin = self.cos.narrow(0, start, 1), self.sin.narrow(0, start, 1)
        return (cos, sin) if dtype == cos.dtype else (cos.to(dtype), sin.to(dtype))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]: here [x2, x1] (a roll by D/2) times the
    signed sin table [-sin, sin] of RotaryEmbedding. x: (B, heads, T, D)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys/values of one attention layer: (B, K, max_len, D). Slots are filled left to right."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        # k, v: (B, K, T, D) written at slots [start, start+T); returns every filled slot (B, K, start+T, D)
        T = k.shape[2]
        self.k.narrow(2, start, T).copy_(k)  # narrow + copy_: fewer ops than slice assignment (decode is op-bound)
        self.v.narrow(2, start, T).copy_(v)
        return self.k.narrow(2, 0, start + T), self.v.narrow(2, 0, start + T)

    def prepare(self, end: int) -> bool:
        """For the fused decode kernel, which writes one row's slots directly: make slots [0, end) writable and say
        whether this is a one-row fp32 cache that fits them (caches whose rows fill different slots override it)."""
        return self.k.shape[0] == 1 and self.k.dtype == torch.float32 and end <= self.k.shape[2]


def causal_mask(T: int, S: int, device=None) -> Tensor:
    """(T, S) bool, True = may attend: query i (at slot S-T+i) sees keys 0..S-T+i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class Attention(nn.Module):
    proj_ops: tuple | None = None  # (C++ ops, qkv and o descriptors) in a cpp decode layout (leanlm.kernels)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v come from one fused projection: one matmul instead of three is ~25% faster per layer in CPU
        # decode (docs/design.md); hf.py splits/joins the weight for HF checkpoints
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, start: int = 0, mask=None, pos=None) -> Tensor:
        """x (B, T, C) with RoPE rows cos, sin -> (B, T, C). cache: a KVCache written from slot `start`; mask: (B, 1,
        T, S) bool or None (causal); pos: the positions (Stream.pos), which a sparse pattern reads (dense: unused)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, K, S, D), S = start + T
        gqa = self.n_heads != self.n_kv_heads
        if mask is not None:  # explicit (B, 1, T, S) mask, e.g. left padding in a batch of prompts
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif T == 1:  # one new token attends to every filled slot: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        elif k.shape[2] == T:  # plain causal over the new tokens only (training, first prefill)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # chunked prefill on top of a filled cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, k.shape[2], x.device), enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> rotated q (B, H, T, D), rotated k and v (B, K, T, D)."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * K, D).transpose(1, 2)  # (B, H + 2K, T, D)
        # q and k rotated in one go: a decode step is bound by the number of ops, not by their size
        q, k = apply_rope(qkv[:, : H + K], cos, sin).split([H, K], dim=1)
        return q, k, qkv[:, H + K :]

    def keys_read(self, kind: str, length: int | float, keys: float) -> float:
        """Keys a query reads on average in a pass (`Transformer.flops`), given `keys` causally there: all of them."""
        return keys

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype, device=None) -> KVCache:
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, dtype, device)


INITS = ((nn.Linear, "reset_parameters"), (nn.Embedding, "reset_parameters"), (RotaryEmbedding, "reset"))


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device, to be filled by an assigning load, without their init (random weights, the
    RoPE tables: `model.rope.reset(device)` after the load): on meta, torch runs those ops through Python references
    that import torch._dynamo (1.2 s of a cold start), for values that are overwritten anyway."""
    saved = {(cls, name): getattr(cls, name) for cls, name in INITS}
    for cls, name in saved:
        setattr(cls, name, lambda self, *args, **kwargs: None)
    try:
        with torch.device("meta"):
            yield
    finally:
        for (cls, name), init in saved.items():
            setattr(cls, name, init)


WeightOf = Callable[[nn.Module], Any]  # a layer -> the C++ decode ops' descriptor of its weight, or None (kernels.py)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up computed by one fused matmul.

    Also the FFN hook's base class: an FFN a method builds (`Transformer(cfg, ffn=...)`) subclasses it and may
    override `decode_layout`, `decode_step` and `flops_per_token`.
    """

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * ffn_dim, bias=False)  # [gate; up] rows, fused like qkv_proj
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)

    def flops_per_token(self, kind: str) -> float:
        """Executed FLOPs per token in a pass of `kind` (see `Transformer.flops`): 2 per weight."""
        return 2.0 * self.gate_up_proj.weight.numel() + 2.0 * self.down_proj.weight.numel()

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        """Entered by leanlm.kernels.decode_layout after it made the Linear weights column-major (an FFN with a
        layout of its own switches here)."""
        yield

    def decode_step(self, norm: RMSNorm, ops: Any, weight: WeightOf) -> Callable[[Tensor], Tensor] | None:
        """x -> x + FFN(norm(x)) for one token (1, 1, C) through the C++ ops, made once per decode layout; None
        when the ops cannot read the weights as the layers do (the block then keeps PyTorch). `weight(layer)` is the
        ops' descriptor of a layer's weight, or None (leanlm.kernels.decode_weight)."""
        if type(self).forward is not MLP.forward:  # an FFN of its own: the dense op would compute something else
            return None
        w_gu, w_d = weight(self.gate_up_proj), weight(self.down_proj)  # (2F, C), (C, F)
        if w_gu is None or w_d is None:
            return None
        args = (norm.weight.detach(), norm.eps, w_gu, w_d)
        return lambda x: ops.mlp_decode(x, *args)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mlp: MLP | None = None, attn: Attention | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = attn if attn is not None else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg.dim, cfg.ffn_dim)
        # set by leanlm.kernels.decode_layout(model, "cpp"): (the C++ ops, the attention op's arguments: its norm
        # and the qkv and o weights' descriptors, the FFN half as one function), for one-token steps of one row
        self.fused: tuple[Any, tuple, Callable[[Tensor], Tensor]] | None = None

    def forward(self, x, cos, sin, cache=None, start=0, mask=None, pos=None) -> Tensor:
        """x (B, T, C) -> (B, T, C); the other arguments as Attention.forward's (RoPE rows, KV cache, its first
        slot, attention mask, positions)."""
        one = self.fused is not None and x.shape[0] * x.shape[1] == 1 and not torch.is_grad_enabled()
        if one and mask is None and cache is not None and cache.prepare(start + 1):
            return self._decode_fused(x, cos, sin, cache, start)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask, pos)
        # a cache the fused attention op cannot write (a sparse layer's): the FFN half stays fused
        return self.fused[2](x) if one else x + self.mlp(self.post_attention_layernorm(x))

    def _decode_fused(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, start: int) -> Tensor:
        """One token (1, 1, C) of one row through the C++ ops; its key and value go to cache slot `start`."""
        ops, (w_n, eps, w_qkv, w_o), mlp = self.fused
        # x (1, 1, C), cos/sin (D values) and the caches (1, K, L, D) go in as they are: a view costs a dispatch
        x = ops.attn_decode(x, w_n, eps, w_qkv, cos, sin, cache.k, cache.v, start, w_o)
        return mlp(x)  # x + FFN(norm(x))


# ---------------------------------------------------------------------------------------------------------------------
# the token-routing hook


@dataclass(slots=True, eq=False)
class Stream:
    """The tokens a run of blocks sees. A token router hands the blocks a subset of them as a new Stream whose
    `outer` is the stream it came from, and restores `outer` after them.

    x (B, T, C); pos: absolute positions (B or 1, T), or the int p for one token at position p; cos, sin: their RoPE
    rows; start: cache slot of the first token; mask: (B, 1, T, S) bool or None (causal); valid: (B, T) real tokens
    (None: all); skip: no row has a token here, so the blocks are skipped.
    """

    x: Tensor | None
    pos: Tensor | int
    cos: Tensor | None
    sin: Tensor | None
    start: int = 0
    mask: Tensor | None = None
    valid: Tensor | None = None
    outer: Stream | None = None
    saved: Any = None  # the router's note for restoring `outer` (e.g. the kept indices)
    skip: bool = False


class TokenRouter:
    """Which tokens each block sees. `Transformer.forward` calls `begin` once per forward, then `enter(i, s)` before
    and `leave(i, s)` after block i; a router may also own the KV caches (`caches`), switch layout for decoding
    (`decode_layout`) and say what a pass executes (`flow`). The defaults route nothing."""

    def begin(self, s: Stream) -> Stream:
        return s

    def enter(self, i: int, s: Stream) -> Stream:
        return s

    def leave(self, i: int, s: Stream) -> Stream:
        return s

    def caches(self, batch: int, max_len: int, dtype: torch.dtype, make: Callable[[int], KVCache]) -> list | None:
        """Every layer's KV cache, for a router whose layers cache different tokens (`make(i)`: layer i's own cache
        for all tokens); None: the layers' own caches."""
        return None

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        yield

    def flow(self, kind: str, length: int | float, step: int | None = None) -> tuple[list, list, float] | None:
        """Per layer, the tokens a pass of `kind` runs through the block and the keys each attends to, plus the
        router's own FLOPs (see `Transformer.flops`); a training pass at optimizer step `step` (default: the current
        one). None: every token through every block."""
        return None


# ---------------------------------------------------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    """The dense baseline. State-dict keys are HF LlamaForCausalLM's without `model.`, q/k/v and gate/up fused.

    ffn(layer) builds block `layer`'s FFN (default: the SwiGLU MLP). `router` (a TokenRouter) and `methods` (the
    method objects of leanlm.methods, for the training loop, benchmarks and reports) are set by leanlm.methods.
    """

    def __init__(self, cfg: ModelConfig, ffn: Callable[[int], Any] | None = None, attn: Callable | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        ffn, attn = ffn or (lambda i: None), attn or (lambda i: None)
        self.layers = nn.ModuleList(Block(cfg, ffn(i), attn(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)
        self.tie_head()
        self.router: TokenRouter | None = None
        self.methods: tuple = ()
        self.caches: list[KVCache] | None = None
        # set by leanlm.kernels.decode_layout(model, "cpp"): (the C++ ops, the final norm's weight and eps and the
        # lm head's descriptor, the embedding's descriptor), for one-token steps of one row
        self.fused: tuple[Any, tuple[Tensor, float, Any], Any] | None = None

    # -- construction -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> Transformer:
        """GPT-2/LLaMA-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers); then each
        method initialises what it added (`Method.init_weights`)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif p.dim() >= 2:
                s = (
                    std / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else std
                )
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
        for m in self.methods:
            m.init_weights(self, seed)
        return self

    def tie_head(self) -> None:
        """With tie_embeddings, make the lm head's weight the embedding's (after construction or an assigning load; a
        packed head reads its embedding by itself, leanlm.quant.TiedHead)."""
        if self.cfg.tie_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight

    def num_params(self, embeddings: bool = True) -> int:
        """Weights, counted as values whatever their storage: a packed (quantized) weight is a buffer, counted as
        the (N, K) matrix it holds."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        n += sum(m.out_features * m.in_features for m in self.modules() if isinstance(m, Packed))
        if not embeddings:
            e = self.embed_tokens
            n -= e.out_features * e.in_features if isinstance(e, Packed) else e.weight.numel()
        return n

    # -- cost accounting ----------------------------------------------------------------------------------------------

    def flops(self, kind: str, length: int | float) -> float:
        """Executed FLOPs per token of one pass, counting only what runs.

        kind "train" and "prefill": a causal pass over `length` tokens (train: forward + backward = 3x forward);
        "decode": one cached step of one token attending to `length` keys. Matmuls count 2 FLOPs per weight (lm head
        included, embedding lookup excluded); attention counts QK^T and AV: 4 * H * D per key, and a causal pass
        attends to (length + 1) / 2 keys on average. Norms, RoPE and softmax are ignored (<1%). The router says how
        many tokens each block runs and the keys they attend to (`TokenRouter.flow`), each FFN what it computes per
        token (`MLP.flops_per_token`).
        """
        if kind not in PASSES:
            raise LeanLMError(f"unknown pass {kind!r} (choose from {', '.join(PASSES)})")
        cfg = self.cfg
        n, keys = (1.0, float(length)) if kind == "decode" else (float(length), (length + 1) / 2)
        flow = self.router.flow(kind, length) if self.router is not None else None
        tokens, attended, extra = flow or ([n] * cfg.n_layers, [keys] * cfg.n_layers, 0.0)
        H, K, D, C = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        attn = 2 * (2 * C * H * D + 2 * C * K * D)  # q, o + k, v projections
        total = extra + n * 2 * C * cfg.vocab_size  # + the lm head
        for block, t, s in zip(self.layers, tokens, attended):
            s = block.self_attn.keys_read(kind, length, s)
            total += t * (attn + 4 * H * D * s + block.mlp.flops_per_token(kind))
        per_token = total / n
        return 3 * per_token if kind == "train" else per_token

    # -- inference state ----------------------------------------------------------------------------------------------

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache per layer for `batch` rows and up to `max_len` tokens."""
        if max_len > self.cfg.max_seq_len:
            raise LeanLMError(f"{max_len} tokens do not fit the model's context of {self.cfg.max_seq_len}")
        dtype = dtype or self.norm.weight.dtype  # the norm: a float parameter even when the embedding is packed
        dev = self.norm.weight.device

        def make(i: int) -> KVCache:
            return self.layers[i].self_attn.make_cache(batch, max_len, dtype, dev)

        own = self.router.caches(batch, max_len, dtype, make) if self.router is not None else None
        self.caches = own or [make(i) for i in range(len(self.layers))]

    def reset_caches(self) -> None:
        self.caches = None

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(self, idx: Tensor, pos: Tensor | None = None, start: int = 0, mask=None, last_only=False) -> Tensor:
        """Logits (B, T, vocab) for tokens idx (B, T).

        Args:
            pos: absolute RoPE positions (B, T) or (1, T); default start..start+T-1.
            start: cache slot of the first new token (used only when caches are set up).
            mask: optional (B, 1, T, start+T) bool attention mask (True = attend); default causal.
            last_only: project only the last position to the vocabulary (prefill in generation).
        """
        T = idx.shape[1]
        x = self.embed(idx)  # (B, T, C)
        s = Stream(x, *self.rope_rows(pos, start, T, x), start, mask)
        router, caches = self.router, self.caches or [None] * len(self.layers)
        if router is not None:
            s = router.begin(s)
        for i, layer in enumerate(self.layers):
            if router is not None:
                s = router.enter(i, s)
            if not s.skip:
                s.x = layer(s.x, s.cos, s.sin, caches[i], s.start, s.mask, s.pos)
            if router is not None:
                s = router.leave(i, s)
        return self.logits(s.x, last_only)

    def rope_rows(self, pos: Tensor | None, start: int, T: int, x: Tensor) -> tuple[Tensor | int, Tensor, Tensor]:
        """Positions of T tokens with hidden states x (`pos`, or start..) and their RoPE cos, signed sin. For one
        token without `pos` (a decode step of unpadded rows) the position stays the int `start` and the rows are
        (1, D) views of the tables (a gather and a positions tensor cost ~0.1 ms mid-step, docs/design.md);
        otherwise a (1 or B, T) tensor and (1 or B, 1, T, D) rows."""
        if pos is None and T == 1:
            return (start, *self.rope.at(start, x.dtype))
        if pos is None:
            pos = torch.arange(start, start + T, device=x.device).unsqueeze(0)  # (1, T)
        return (pos, *self.rope(pos, x.dtype))

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> embeddings (B, T, C)."""
        if self.fused is not None and idx.numel() == 1 and not torch.is_grad_enabled():
            return self.fused[0].embed_decode(idx, self.fused[2])  # one token of one row: one call
        return self.embed_tokens(idx)

    def logits(self, x: Tensor, last_only: bool = False) -> Tensor:
        """Final norm and lm head: hidden states (B, T, C) -> logits (B, T, vocab), or (B, 1, vocab) for the last
        position only."""
        if self.fused is not None and x.shape[0] * x.shape[1] == 1 and not torch.is_grad_enabled():
            return self.fused[0].head_decode(x, *self.fused[1])  # one token of one row: one fused op
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, vocab)
