"""Block-sparse attention on original positions: one engine for sink + sliding window (StreamingLLM, LongGen),
S2-Attention's per-head strided blocks and InfLLM v2's top-k block selection (leanlm.methods.attention plugs it in).

Positions are cut into blocks of `block` tokens. A query in block i may read key block j <= i of its KV head h if

    sink:    j < sink / block                                   (every pattern)
    local:   i - j < window / block                             (every pattern)
    s2:      (j + h * step) % vert_stride == 0, step = max(1, vert_stride // n_kv_heads)   (DKernel's rule)
    infllm2: j is one of the top-k blocks of the query's KV-head group (scores below); k counts sink and local

with token-level causality inside the diagonal block. Every rule reads original positions (RoPE position ids), so a
layer that sees a subset of the tokens (a token router) keeps the same pattern. InfLLM v2 scores the blocks outside
the sink and the local window by their "semantic kernels": key means over `kernel` tokens every `kernel_stride`
tokens; a block scores the maximum, over the kernels inside it, of softmax(q . kernel / sqrt(D)) (over all scored
kernels), summed over the query heads of the group; a query below position `dense_len` reads everything.

Three ways to compute the same attention (tests hold them equal): the dense baseline (when the pattern covers every
key), a masked SDPA reference (any positions, any mask) and a block-gather path (contiguous positions from 0: each
query block gathers only its key blocks, so skipped blocks cost nothing). Decoding keeps per-layer caches sized by the
pattern: sink + a ring buffer of the window (sink_window), + each KV head's own strided blocks (s2), every key but
only the top-k blocks read (infllm2): leanlm/sparse_cache.py.

Shapes: B batch, T queries, S keys, H query heads, K kv heads, G = H / K, D head dim, NB key blocks, M blocks read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from leanlm.errors import LeanLMError
from leanlm.model import Attention, ModelConfig, apply_rope
from leanlm.sparse_cache import SparseCache, kernel_means, kernel_scores, sdpa_per_kv_head

PATTERNS = ("sink_window", "s2", "infllm2")
SCHEDULES = ("all", "longgen", "every_n")
CHUNK_BYTES = 64 << 20  # gathered keys and values per chunk of query blocks (bounds prefill memory)


@dataclass
class SparseConfig:
    """The `model.attention` section: the sparse pattern and which layers use it."""

    pattern: str = "sink_window"  # sink_window | s2 | infllm2
    block: int = 64  # tokens per block
    window: int = 1024  # local window in tokens (whole blocks; the query's own block included)
    sink: int = 64  # initial tokens every query reads (whole blocks; 0 = none)
    vert_stride: int = 8  # s2: each KV head reads every vert_stride-th block (its own residue class)
    heterogeneous: bool = True  # s2: heads read different residue classes (False: all read class 0)
    topk: int = 16  # infllm2: blocks read per query, sink and local blocks included
    kernel: int = 32  # infllm2: tokens per semantic kernel (key mean)
    kernel_stride: int = 16  # infllm2: a kernel every kernel_stride tokens
    dense_len: int = 0  # infllm2: queries at positions below it read every key
    schedule: str | list[int] = "all"  # all | longgen (outer thirds sparse) | every_n | a list of sparse layers
    every_n: int = 2  # every_n: layer i is full when i % every_n == every_n - 1, sparse otherwise
    layers: list[int] = field(default_factory=list)  # derived: the sparse layers (set by check)

    def check(self, model_cfg: ModelConfig) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.attention.{name}: {why} (got {getattr(self, name)!r})")

        if self.pattern not in PATTERNS:
            raise bad("pattern", f"must be one of {', '.join(PATTERNS)}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise bad("window", "must be a positive integer: a query reads at least its own block")
        for name in ("block", "vert_stride", "topk", "kernel", "kernel_stride", "every_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("sink", "dense_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be a non-negative integer")
        if self.window % self.block:
            raise bad("window", f"must be a multiple of block={self.block} (whole blocks)")
        if self.sink % self.block:
            raise bad("sink", f"must be a multiple of block={self.block} (whole blocks)")
        if self.window + self.sink > model_cfg.max_seq_len:
            raise bad("window", f"sink + window exceed the model's context of {model_cfg.max_seq_len}")
        if self.pattern == "infllm2":
            forced = (self.sink + self.window) // self.block
            if self.topk < forced:
                raise bad("topk", f"must cover the sink and local blocks ({forced})")
            if self.topk * self.block > model_cfg.max_seq_len:
                raise bad("topk", f"topk x block exceeds the model's context of {model_cfg.max_seq_len}")
            if (
                self.kernel > self.block
                or self.kernel_stride > self.kernel
                or (self.block - self.kernel) % self.kernel_stride
            ):
                raise bad(
                    "kernel", f"kernels of {self.kernel} every {self.kernel_stride} must tile a block of {self.block}"
                )
        self.layers = sparse_layers(self.schedule, self.every_n, model_cfg.n_layers)

    @property
    def local_blocks(self) -> int:
        return self.window // self.block

    @property
    def sink_blocks(self) -> int:
        return self.sink // self.block

    def budget(self, context: int) -> int:
        """Keys a query reads at most at position context - 1 (a layer's per-head KV budget for s2 and sink_window)."""
        if self.pattern == "s2":
            return min(
                context, self.sink + self.window + math.ceil(context / self.block / self.vert_stride) * self.block
            )
        if self.pattern == "infllm2":
            return context if context <= self.dense_len else min(context, self.topk * self.block)
        return min(context, self.sink + self.window)


def sparse_layers(schedule: str | list[int], every_n: int, n_layers: int) -> list[int]:
    """The layers a schedule makes sparse: all; longgen (the bottom and top thirds, the middle third stays full);
    every_n; or an explicit list."""
    if isinstance(schedule, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in schedule):
            raise LeanLMError(f"model.attention.schedule: a list of layer indices (got {schedule!r})")
        bad = [i for i in schedule if not 0 <= i < n_layers]
        if bad:
            raise LeanLMError(f"model.attention.schedule: layer {bad[0]} does not exist (the model has {n_layers})")
        if len(set(schedule)) != len(schedule):
            raise LeanLMError(f"model.attention.schedule: a layer is listed twice (got {schedule!r})")
        return sorted(schedule)
    if schedule == "all":
        return list(range(n_layers))
    if schedule == "longgen":
        full = round(n_layers / 3)
        lo = (n_layers - full) // 2
        return [i for i in range(n_layers) if not lo <= i < lo + full]
    if schedule == "every_n":
        return [i for i in range(n_layers) if i % every_n != every_n - 1]
    raise LeanLMError(
        f"model.attention.schedule: must be a list of layers or one of {', '.join(SCHEDULES)} (got {schedule!r})"
    )


class SparseAttention(Attention):
    """The baseline's attention (same weights) reading only what `sp` allows; see the module docstring."""

    def __init__(self, cfg: ModelConfig, sp: SparseConfig):
        super().__init__(cfg)
        self.sp = sp
        K = cfg.n_kv_heads
        step = max(1, sp.vert_stride // K) if sp.heterogeneous else 0
        self.step = step  # s2: KV head h reads the blocks j with (j + h * step) % vert_stride == 0
        self.blocks_read = [0, 0]  # (blocks read, blocks causally available), summed since the last reset

    # -- the pattern ---------------------------------------------------------------------------------------------------

    def static(self, qb: Tensor, kb: Tensor) -> Tensor:
        """Block rule without the dynamic (infllm2) part: qb (..., T, 1), kb (..., 1 or K, 1, S) -> (..., K, T, S)."""
        sp = self.sp
        ok = ((qb - kb) < sp.local_blocks) | (kb < sp.sink_blocks)
        if sp.pattern == "s2":
            ok = ok | ((kb + self.offset(kb.device).view(-1, 1, 1)) % sp.vert_stride == 0)
        return ok & (kb <= qb)

    def offset(self, device) -> Tensor:
        """(K,) each KV head's shift of the s2 residues (a plain tensor, not a buffer: models are built on meta)."""
        return torch.arange(self.n_kv_heads, device=device) * self.step

    def covers(self, n: int) -> bool:
        """Whether every causal key of a sequence of n tokens is read (then the baseline's dense attention runs)."""
        sp, nb = self.sp, -(-n // self.sp.block)
        if sp.pattern == "infllm2":
            return n <= sp.dense_len or nb <= sp.topk
        return nb <= sp.local_blocks + sp.sink_blocks or (sp.pattern == "s2" and sp.vert_stride == 1)

    def means(self, k: Tensor) -> Tensor | None:
        """InfLLM v2's kernel means of the whole blocks of k (B, K, S, D) at positions 0..S-1 (a partial last block
        is never a candidate); None for the static patterns, which read no keys to choose."""
        return kernel_means(k, self.sp) if self.sp.pattern == "infllm2" else None

    def select(self, q: Tensor, qpos: Tensor, nb: int, means: Tensor | None) -> Tensor:
        """Per query, which of nb key blocks it reads: q (B, H, T, D) at qpos (B or 1, T) -> (B or 1, K, T, NB)
        bool. InfLLM v2 picks its dynamic blocks by the kernel means (B, K, NB', nk, D) of whole blocks 0..NB'-1."""
        sp = self.sp
        qb = (qpos // sp.block).unsqueeze(1).unsqueeze(-1)  # (B, 1, T, 1)
        kb = torch.arange(nb, device=q.device).view(1, 1, 1, nb)
        ok = self.static(qb, kb).expand(-1, self.n_kv_heads, -1, -1)  # (B, K, T, NB)
        if sp.pattern != "infllm2":
            return ok
        ok = ok | ((qpos < sp.dense_len).unsqueeze(1).unsqueeze(-1) & (kb <= qb))
        return (ok | self._top(q, means, qb, kb, ok)) if means.shape[2] else ok

    def _top(self, q: Tensor, means: Tensor, qb: Tensor, kb: Tensor, forced: Tensor) -> Tensor:
        """InfLLM v2's dynamic blocks: the best topk - |forced| candidate blocks per query and KV-head group."""
        sp = self.sp
        B, _, T, _ = q.shape
        K, nbm = means.shape[1], means.shape[2]
        kb = kb[..., :nbm]
        cand = (kb <= qb - sp.local_blocks) & (kb >= sp.sink_blocks)  # (B, 1, T, NB): whole blocks outside forced
        score = kernel_scores(q, means, cand).masked_fill(~cand, -1.0)  # (B, K, T, NB)
        n_forced = forced.sum(-1, keepdim=True)  # (B, K, T, 1)
        want = (sp.topk - n_forced).clamp(min=0)
        m = min(sp.topk, nbm)
        top = score.topk(m, dim=-1)  # (B, K, T, m)
        keep = (torch.arange(m, device=q.device) < want) & (top.values >= 0)
        out = torch.zeros(B, K, T, forced.shape[-1], dtype=torch.bool, device=q.device)
        out[..., :nbm].scatter_(-1, top.indices, keep)
        return out

    # -- attention -----------------------------------------------------------------------------------------------------

    def forward(self, x, cos, sin, cache=None, start=0, mask=None, pos=None) -> Tensor:
        B, T, _ = x.shape
        if cache is not None and not isinstance(cache, SparseCache):
            raise LeanLMError("sparse attention got another method's KV cache (a layer a token router subsamples)")
        if cache is not None and T == 1 and mask is None and not isinstance(pos, Tensor):
            q, k, v = self.project(x, cos, sin)
            p = start if pos is None else pos
            # a decode step of unpadded rows: few ops
            return self._out(
                cache.step(q, k, v, p) if self.sp.pattern != "infllm2" else cache.step_selected(self, q, k, v, p)
            )
        qpos = _positions(pos, start, T, x.device)  # (B or 1, T)
        fresh = mask is None and _contiguous(qpos)  # positions 0..T-1 (training, a first prefill)
        if fresh and cache is None and self.covers(T):
            return super().forward(x, cos, sin)  # the pattern reads every key: the baseline, bit for bit
        q, k, v = self.project(x, cos, sin)  # (B, H, T, D), (B, K, T, D) x2
        if fresh:
            gqa = self.n_heads != self.n_kv_heads
            y = (
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                if self.covers(T)
                else self.gathered(q, k, v)
            )
            if cache is not None:
                cache.store(qpos.expand(B, -1), torch.ones(B, T, dtype=torch.bool, device=x.device), k, v)
        elif cache is not None:
            y = cache.attend(self, q, k, v, qpos, mask)
        else:
            y = self.masked(q, k, v, qpos, qpos, mask)
        return self._out(y)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The baseline's projection; one token of one row in a cpp decode layout goes through the C++ GEMV (packed
        weights are otherwise dequantized by PyTorch for every token)."""
        if self.proj_ops is None or x.shape[0] * x.shape[1] != 1 or torch.is_grad_enabled():
            return super().project(x, cos, sin)
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.proj_ops[0].matvec(x.reshape(-1), self.proj_ops[1]).view(1, H + 2 * K, 1, D)
        q, k = apply_rope(qkv[:, : H + K], cos, sin).split([H, K], dim=1)
        return q, k, qkv[:, H + K :]

    def _out(self, y: Tensor) -> Tensor:
        """The output projection of y (B, H, T, D) -> (B, T, C); one token of one row in a cpp decode layout through
        the C++ GEMV, as `project`."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if self.proj_ops is None or B * T != 1 or torch.is_grad_enabled():
            return self.o_proj(y)
        return self.proj_ops[0].matvec(y.view(-1), self.proj_ops[2]).view(1, 1, -1)

    def masked(self, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, mask: Tensor | None) -> Tensor:
        """The reference: SDPA over every key with the pattern as a mask. k, v (B, K, S, D) at positions kpos
        (B or 1, S) of a contiguous run from 0 (training) or any subset (a token router's)."""
        n = int(kpos.max()) + 1
        kfull = k if kpos.shape[-1] == n and _contiguous(kpos) else _scatter_positions(k, kpos, n)
        sel = self.select(q, qpos, -(-n // self.sp.block), self.means(kfull))  # (B, K, T, NB)
        Bq = max(sel.shape[0], kpos.shape[0], q.shape[0])
        kb = (kpos // self.sp.block).view(kpos.shape[0], 1, 1, -1).expand(Bq, sel.shape[1], q.shape[2], -1)
        allow = sel.expand(Bq, -1, -1, -1).gather(-1, kb)  # (B, K, T, S)
        allow = allow & (kpos.view(kpos.shape[0], 1, 1, -1) <= qpos.view(qpos.shape[0], 1, -1, 1))
        if mask is not None:
            allow = allow & mask
        self.count(sel, qpos)
        return sdpa_per_kv_head(q, k, v, allow.expand(q.shape[0], -1, -1, -1))

    def gathered(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Positions 0..T-1: each query block gathers only the key blocks its queries read."""
        sp, T = self.sp, q.shape[2]
        bs = sp.block
        nb = -(-T // bs)
        pad = nb * bs - T
        qpos = torch.arange(nb * bs, device=q.device).unsqueeze(0)
        if pad:  # padding queries read their own block: no empty row, no NaN in the backward
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if sp.pattern == "infllm2":
            sel = self.select(q, qpos, nb, self.means(k))  # (B, K, nb * bs, NB) per token
            self.count(sel[:, :, :T], qpos[:, :T])
        else:  # one rule per query block (causality inside the diagonal block is the tiles' job)
            sel = self.select(q[:, :, ::bs], qpos[:, ::bs], nb, None)  # (1, K, NB, NB)
            self.count(sel, qpos[:, ::bs], (T - qpos[0, ::bs]).clamp(max=bs))
        return self._tiles(q, k, v, sel, qpos[0])[:, :, :T]

    def _tiles(self, q: Tensor, k: Tensor, v: Tensor, sel: Tensor, qpos: Tensor) -> Tensor:
        """Attention over gathered blocks. Queries go in tiles of r consecutive blocks per KV head (S2's Merge-Q: a
        matmul of 64 rows runs at half the speed of one of 256); a tile gathers the union of the blocks its queries
        read, in block order, and masks per token. Tiles that gather the same number of blocks run as one batch.
        q (B, H, T, D), k, v (B, K, T, D), T whole blocks; sel (Bs, K, T, NB) per token (Bs 1: the same for every
        row); qpos (T,)."""
        B, H, T, D = q.shape
        Bs, K, rows, nb = sel.shape
        G, bs = H // K, self.sp.block
        g = T // rows  # query tokens per row of sel: 1 (per token) or bs (per block)
        r = 1 if self.sp.pattern == "infllm2" else max(1, min(self.sp.local_blocks, 256 // (G * bs), nb))
        nt = -(-nb // r)
        if nt * r > nb:  # pad to whole tiles: padded queries read their own block (masked out below)
            extra = (nt * r - nb) * bs
            q = F.pad(q, (0, 0, 0, extra))
            sel = torch.cat([sel, sel[:, :, -1:].expand(-1, -1, extra // g, -1)], 2)
            qpos = torch.cat([qpos, qpos.new_full((extra,), T - 1)])
        L = r * bs
        tiles = sel.view(Bs, K, nt, L // g, nb)
        union = tiles.any(3)  # (Bs, K, NT, NB)
        # tiles and blocks as rows of flat views: index_select copies whole rows (advanced indexing is 4x slower)
        qp = q.view(B, K, G, nt, L, D).transpose(2, 3).reshape(B, K * nt, G * L * D)
        kb, vb = k.reshape(B, K * nb, bs * D), v.reshape(B, K * nb, bs * D)
        out = q.new_empty(B, K * nt, G * L * D)
        counts = union.sum(-1)  # (Bs, K, NT)
        kpos_in = torch.arange(bs, device=q.device)
        hidden = torch.full((bs, bs), float("-inf"), dtype=q.dtype, device=q.device)
        lut = torch.stack([hidden, torch.zeros_like(hidden), hidden.triu(1)])  # masks: hidden, visible, diagonal
        for m in counts.unique().tolist():
            b, h, t = (counts == m).nonzero(as_tuple=True)
            idx = union[b, h, t].nonzero()[:, 1].view(-1, m)  # (N, m) block ids, ascending
            tok = tiles[b, h, t].gather(-1, idx.unsqueeze(1).expand(-1, L // g, -1))  # (N, L / g, m)
            step = max(1, CHUNK_BYTES // (2 * B * m * bs * D * q.element_size()))
            if g == 1:  # per-token sets: a mask per tile
                groups = [(torch.arange(c, min(c + step, len(h))), None) for c in range(0, len(h), step)]
            else:  # per-block sets: tiles with the same block code (hidden, visible, diagonal) share one mask
                qb = (t * r).view(-1, 1, 1) + torch.arange(r, device=q.device).view(1, r, 1)  # (N, r, 1)
                code = torch.where(tok, 1 + (idx.unsqueeze(1) == qb).long(), 0)  # (N, r, m)
                codes, inv = code.flatten(1).unique(dim=0, return_inverse=True)
                groups = []
                for u in range(len(codes)):
                    mask = lut[codes[u].view(r, m)].permute(0, 2, 1, 3).reshape(L, m * bs)  # (L, m*bs)
                    mask = mask.repeat(G, 1)[None, None]  # (1, 1, G*L, m*bs): shared by the tiles
                    members = (inv == u).nonzero().flatten()
                    groups += [(members[c : c + step], mask) for c in range(0, len(members), step)]
            for sel_i, mask in groups:
                bc, hc, tc, jc = b[sel_i], h[sel_i], t[sel_i], idx[sel_i]
                n = len(hc)
                if mask is None:
                    kpos = (jc.unsqueeze(-1) * bs + kpos_in).view(n, 1, m * bs)
                    ok = tok[sel_i].repeat_interleave(bs, -1) & (
                        kpos <= qpos.view(nt, L)[tc].unsqueeze(-1)
                    )  # (n, L, m*bs)
                    mask = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
                    mask = mask.unsqueeze(1).expand(-1, G, -1, -1).reshape(1, n, G * L, m * bs)
                # 4-D inputs and mask: the flash kernel (3-D ones take the math path)
                ti, bi = hc * nt + tc, (hc.unsqueeze(1) * nb + jc).flatten()  # tile rows, block rows
                if Bs == 1:  # the same tiles in every row
                    qs, ks, vs = qp.index_select(1, ti), kb.index_select(1, bi), vb.index_select(1, bi)
                    y = F.scaled_dot_product_attention(
                        qs.view(B, n, G * L, D), ks.view(B, n, m * bs, D), vs.view(B, n, m * bs, D), attn_mask=mask
                    )
                    out.index_copy_(1, ti, y.reshape(B, n, G * L * D))
                else:
                    qs, ks, vs = qp[bc, ti], kb[bc.repeat_interleave(m), bi], vb[bc.repeat_interleave(m), bi]
                    y = F.scaled_dot_product_attention(
                        qs.view(1, n, G * L, D), ks.view(1, n, m * bs, D), vs.view(1, n, m * bs, D), attn_mask=mask
                    )
                    out[bc, ti] = y.reshape(n, G * L * D)
        return out.view(B, K, nt, G, L, D).transpose(2, 3).reshape(B, H, nt * L, D)

    def count(self, sel: Tensor, qpos: Tensor, rows: Tensor | None = None) -> None:
        """Blocks read per query vs blocks causally there (the fraction reported), outside autograd. sel (B, K, T,
        NB) per query at qpos (B, T), or per query block with `rows` (T,) queries each."""
        with torch.no_grad():
            w = rows if rows is not None else torch.ones_like(qpos[0])
            self.blocks_read[0] += int((sel.sum(-1) * w).sum()) * (self.n_kv_heads // sel.shape[1])
            there = ((qpos // self.sp.block + 1) * w).sum()
            self.blocks_read[1] += int(there) * self.n_kv_heads * max(sel.shape[0], qpos.shape[0])

    # -- cost ----------------------------------------------------------------------------------------------------------

    def keys_read(self, kind: str, length: float, keys: float) -> float:
        """Keys one query reads on average (`Transformer.flops`): at decode the budget at `length`, in a causal pass
        the mean over positions 0..length-1 of the budget there."""
        n = int(length)
        if n <= 0:
            return keys
        if kind == "decode":
            return min(keys, float(self.sp.budget(n)))
        points = range(1, n + 1, max(1, n // 256))  # sampled positions (+ 1)
        frac = sum(self.sp.budget(p) / p for p in points) / len(points)
        return min(keys, keys * frac)

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype, device=None) -> SparseCache:
        return SparseCache(self, batch, max_len, dtype, device)


def _positions(pos: Tensor | int | None, start: int, T: int, device) -> Tensor:
    if isinstance(pos, Tensor):
        return pos.long()
    first = start if pos is None else pos
    return torch.arange(first, first + T, device=device).unsqueeze(0)


def _contiguous(pos: Tensor) -> bool:
    """Positions (B or 1, T) that are 0..T-1 in every row."""
    return pos.shape[0] == 1 and bool((pos[0] == torch.arange(pos.shape[1], device=pos.device)).all())


def _scatter_positions(k: Tensor, kpos: Tensor, n: int) -> Tensor:
    """Keys (B, K, S, D) at positions kpos (B or 1, S) laid out at their positions (B, K, n, D), zeros elsewhere (for
    InfLLM v2's kernels; a token router's subset scores its blocks from the keys it has)."""
    B, K, S, D = k.shape
    out = k.new_zeros(B, K, n, D)
    return out.scatter(2, kpos.expand(B, -1).view(B, 1, S, 1).expand(-1, K, -1, D), k)
