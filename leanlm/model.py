"""The dense LLaMA baseline, all of it in this one file.

Math and parameter names follow Hugging Face `LlamaForCausalLM` (half-split RoPE with fp32 angles, RMSNorm in fp32,
SwiGLU), except that q/k/v and gate/up are fused into one projection each (`qkv_proj`, `gate_up_proj`) because that is
measurably faster; hf.py maps HF state dicts in and out, and logits agree with HF to float rounding. Efficiency
methods (subllm.py, ltd.py, lte.py) import `Block`, `Attention`, `MLP`, `RMSNorm` and `RotaryEmbedding` from here
instead of adding flags to this file.

    from leanlm.config import preset
    from leanlm.model import Transformer
    model = Transformer(preset("tiny"))
    logits = model(torch.randint(0, 512, (2, 16)))   # (B, T, vocab)

Shapes: B batch, T new tokens, S keys attended (cache length), H query heads, K kv heads, D head dim, C model width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.config import ModelConfig
from leanlm.kernels import check_kernel, cpp_kernels


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
        tables (a decode step pays ~0.1 ms for the gather and its positions tensor, see kernels.cpp)."""
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
        whether this is a one-row fp32 cache that fits them (methods whose rows fill different slots override it)."""
        return self.k.shape[0] == 1 and self.k.dtype == torch.float32 and end <= self.k.shape[2]


def causal_mask(T: int, S: int, device=None) -> Tensor:
    """(T, S) bool, True = may attend: query i (at slot S-T+i) sees keys 0..S-T+i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v come from one fused projection: one matmul instead of three is ~25% faster per layer in CPU
        # decode (docs/design.md); hf.py splits/joins the weight for HF checkpoints
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * K, D).transpose(1, 2)  # (B, H + 2K, T, D)
        # q and k rotated in one go: a decode step is bound by the number of ops, not by their size
        q, k = apply_rope(qkv[:, : H + K], cos, sin).split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        v = qkv[:, H + K :]  # (B, K, T, D)
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


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up computed by one fused matmul."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * ffn_dim, bias=False)  # [gate; up] rows, fused like qkv_proj
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ffn_dim)
        # decode_layout(model, kernel="cpp"): the attention op's arguments and the FFN half as one function
        self._fused: tuple[tuple, Callable[[Tensor], Tensor]] | None = None
        self._ops = None  # the compiled extension, while _fused is set

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        """Entered by `decode_layout` after it made the Linear weights column-major: with kernel "cpp" and fp32 CPU
        weights, one-token steps of one row run as two fused C++ ops (leanlm/kernels.cpp) reading the same data."""
        qkv, o = self.self_attn.qkv_proj, self.self_attn.o_proj
        w = qkv.weight
        if kernel != "cpp" or w.device.type != "cpu" or w.dtype != torch.float32 or qkv.bias is not None:
            yield
            return
        ops = cpp_kernels()  # build (or load) first: a failure is one error, before any state changes

        def norm(n: RMSNorm) -> tuple[Tensor, float]:
            return n.weight.detach(), n.eps

        attn = (*norm(self.input_layernorm), w.detach().t(), o.weight.detach().t())  # (C,), eps, (C, 3HD), (HD, C)
        weights = [attn[2], attn[3]]
        if type(self.mlp) is MLP:  # the dense SwiGLU
            w_gu, w_d = self.mlp.gate_up_proj.weight.detach().t(), self.mlp.down_proj.weight.detach().t()
            args = (*norm(self.post_attention_layernorm), w_gu, w_d)  # (C,), eps, (C, 2F), (F, C)
            weights += [w_gu, w_d]

            def mlp(x: Tensor) -> Tensor:
                return ops.mlp_decode(x, *args)
        elif hasattr(self.mlp, "decode_step"):  # an FFN with a fused path of its own (LTE)
            mlp = self.mlp.decode_step(self.post_attention_layernorm)
        else:  # an FFN without one: the block keeps PyTorch
            yield
            return
        if not all(t.is_contiguous() for t in weights):
            yield  # not in the column-major layout (e.g. a weight shared in another layout): keep PyTorch
            return
        self._fused, self._ops = (attn, mlp), ops
        try:
            yield
        finally:
            self._fused = self._ops = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        if self._fused is not None and x.shape[0] * x.shape[1] == 1 and mask is None and cache is not None:
            if not torch.is_grad_enabled() and cache.prepare(start + 1):
                return self._decode_fused(x, cos, sin, cache, start)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _decode_fused(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, start: int) -> Tensor:
        """One token (1, 1, C) of one row through the C++ ops; its key and value go to cache slot `start`."""
        (w_n, eps, w_qkv, w_o), mlp = self._fused
        # x (1, 1, C), cos/sin (D values) and the caches (1, K, L, D) go in as they are: a view costs a dispatch
        x = self._ops.attn_decode(x, w_n, eps, w_qkv, cos, sin, cache.k, cache.v, start, w_o)
        return mlp(x)  # x + FFN(norm(x))


class Transformer(nn.Module):
    """The dense baseline. State-dict keys are HF LlamaForCausalLM's without `model.`, q/k/v and gate/up fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.caches: list[KVCache] | None = None
        # while in a cpp decode layout: the final norm's and lm head's kernel arguments, the embedding weight, the ops
        self._head: tuple[Tensor, float, Tensor] | None = None
        self._embed_w: Tensor | None = None
        self._ops = None

    # -- construction -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> Transformer:
        """GPT-2/LLaMA-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
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
        return self

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if not embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    # -- cost accounting ----------------------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Executed FLOPs per token for one causal pass over `seq_len` tokens (x3 for forward + backward).

        Matmuls count 2 FLOPs per weight; attention counts QK^T and AV over the (seq_len+1)/2 keys a token attends to
        on average under the causal mask. Norms, RoPE and softmax are ignored (<1%).
        """
        return dense_flops_per_token(self.cfg, context=(seq_len + 1) / 2, training=training)

    def decode_flops(self, context: float) -> float:
        """Executed FLOPs of one cached decode step of one token that attends to `context` keys (a causal pass
        averages (seq_len + 1) / 2 keys per token; a step late in generation attends to all of them)."""
        return dense_flops_per_token(self.cfg, context=context)

    # -- inference state ----------------------------------------------------------------------------------------------

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache per layer for `batch` rows and up to `max_len` tokens."""
        if max_len > self.cfg.max_seq_len:
            from leanlm.errors import LeanLMError

            raise LeanLMError(f"{max_len} tokens do not fit the model's context of {self.cfg.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        self.caches = [self.new_cache(i, batch, max_len, dtype) for i in range(len(self.layers))]

    def new_cache(self, layer: int, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        """Layer `layer`'s KV cache (methods that cache fewer tokens in some layers override this)."""
        dev = self.embed_tokens.weight.device
        return KVCache(batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, dtype, dev)

    def reset_caches(self) -> None:
        self.caches = None

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        idx: Tensor,
        pos: Tensor | None = None,
        start: int = 0,
        mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) for tokens idx (B, T).

        Args:
            pos: absolute RoPE positions (B, T) or (1, T); default start..start+T-1.
            start: cache slot of the first new token (used only when caches are set up).
            mask: optional (B, 1, T, start+T) bool attention mask (True = attend); default causal.
            last_only: project only the last position to the vocabulary (prefill in generation).
        """
        B, T = idx.shape
        x = self.embed(idx)  # (B, T, C)
        cos, sin, _ = self.rope_rows(pos, start, T, x)
        caches = self.caches or [None] * len(self.layers)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, start, mask)
        return self.logits(x, last_only)

    def rope_rows(self, pos: Tensor | None, start: int, T: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor | int]:
        """RoPE cos, signed sin for T tokens with hidden states x, and their positions: `pos` or, without it, start..
        For one token without `pos` (a decode step of unpadded rows) the rows are (1, D) views of the tables and the
        positions stay the int `start` (a gather and a positions tensor cost ~0.1 ms mid-step, kernels.cpp); otherwise
        (1 or B, 1, T, D) and a (1 or B, T) tensor."""
        if pos is None and T == 1:
            return (*self.rope.at(start, x.dtype), start)
        if pos is None:
            pos = torch.arange(start, start + T, device=x.device).unsqueeze(0)  # (1, T)
        return (*self.rope(pos, x.dtype), pos)

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> embeddings (B, T, C)."""
        if self._embed_w is not None and idx.numel() == 1 and not torch.is_grad_enabled():
            return self._ops.embed_decode(idx, self._embed_w)  # one token of one row: one call (see decode_layout)
        return self.embed_tokens(idx)

    def logits(self, x: Tensor, last_only: bool = False) -> Tensor:
        """Final norm and lm head: hidden states (B, T, C) -> logits (B, T, vocab), or (B, 1, vocab) for the last
        position only."""
        if self._head is not None and x.shape[0] * x.shape[1] == 1 and not torch.is_grad_enabled():
            return self._ops.head_decode(x, *self._head)  # one token of one row: one fused op
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, vocab)

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        """Entered by `decode_layout` after it made the Linear weights column-major: with kernel "cpp" and fp32 CPU
        weights, a one-token step of one row starts and ends with one call each: the embedding, and the final norm
        with the lm head (mid-step a small PyTorch op costs ~0.1 ms, leanlm/kernels.cpp)."""
        w, n, e = self.lm_head.weight, self.norm.weight, self.embed_tokens.weight
        fp32_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (w, n, e))
        if kernel != "cpp" or not fp32_cpu or not w.t().is_contiguous():
            yield
            return
        self._ops = cpp_kernels()
        self._head = (n.detach(), self.norm.eps, w.detach().t())  # (C,), eps, (C, vocab)
        self._embed_w = e.detach()  # (vocab, C), row- or (tied to the lm head) column-major
        try:
            yield
        finally:
            self._head = self._embed_w = self._ops = None


@contextlib.contextmanager
def decode_layout(model: nn.Module, kernel: str = "torch") -> Iterator[None]:
    """Within the block, store every Linear weight (out, in) column-major: same values, shape and Parameter objects,
    but `F.linear` then streams a contiguous (in, out) matrix (MKL's NN gemv). For batch-1 decode on a CPU this is
    ~25% faster for the layer weights and 2x for a 49k-row lm head (docs/design.md); for training-size batches it is
    slower, so the row-major layout is restored on exit. Tied weights stay tied (the data is swapped in place).

    kernel: "torch" (pure PyTorch) or "cpp": one-token steps of one row then run each block (and LTE's FFN) as fused
    C++ ops on the same weights (leanlm/kernels.py).
    """
    check_kernel(kernel)
    params = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dim() == 2}
    # fp32 only: for bf16 the column-major path is ~10x slower on CPUs without native bf16 matmul (measured)
    changed = [p for p in params.values() if p.is_contiguous() and p.dtype == torch.float32]
    # inference_mode(False): called from generate() under inference mode, whose tensors could never train again
    with torch.inference_mode(False), torch.no_grad():
        for p in changed:
            p.data = p.data.t().contiguous().t()
    try:
        with contextlib.ExitStack() as stack:  # modules with a layout of their own (LTE's experts) switch after
            for m in model.modules():
                if hasattr(m, "decode_layout"):
                    stack.enter_context(m.decode_layout(kernel))
            yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p in changed:
                p.data = p.data.contiguous()


def dense_flops_per_token(cfg: ModelConfig, context: float, training: bool = False) -> float:
    """FLOPs per token of the dense model when each token attends to `context` keys."""
    C, D = cfg.dim, cfg.head_dim
    attn_w = C * cfg.n_heads * D * 2 + C * cfg.n_kv_heads * D * 2  # q, o + k, v
    ffn_w = 3 * C * cfg.ffn_dim
    per_layer = 2 * (attn_w + ffn_w) + 4 * cfg.n_heads * D * context  # matmuls + QK^T and AV
    fwd = cfg.n_layers * per_layer + 2 * C * cfg.vocab_size  # + lm head
    return 3 * fwd if training else fwd
