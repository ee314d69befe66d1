"""The KV caches of sparse attention layers (leanlm/sparse.py): keyed by position per row and KV head, sized by the
pattern (a ring buffer of the window + the sink, each KV head's strided blocks for s2, every key with the kernel
means of whole blocks for infllm2), with a fast one-token step and a general path for chunks and padded batches.

Shapes: B batch, T new tokens, H query heads, K kv heads, G = H / K, D head dim, S cached slots.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Pattern(Protocol):
    """What a cache asks of its layer's attention (leanlm.sparse.SparseAttention, which builds the cache)."""

    sp: Any  # its SparseConfig
    n_kv_heads: int
    head_dim: int
    step: int  # s2: KV head h reads the blocks j with (j + h * step) % vert_stride == 0
    blocks_read: list[int]

    def offset(self, device) -> Tensor: ...
    def static(self, qb: Tensor, kb: Tensor) -> Tensor: ...
    def select(self, q: Tensor, qpos: Tensor, nb: int, means: Tensor | None) -> Tensor: ...
    def count(self, sel: Tensor, qpos: Tensor, rows: Tensor | None = None) -> None: ...


def kernel_means(k: Tensor, sp: Any) -> Tensor:
    """InfLLM v2's semantic kernels of the full blocks of k (B, K, S, D): (B, K, S // block, nk, D)."""
    B, K, S, D = k.shape
    nb = S // sp.block
    blocks = k[:, :, : nb * sp.block].reshape(B, K, nb, sp.block, D)
    return blocks.unfold(3, sp.kernel, sp.kernel_stride).mean(-1)  # (B, K, NB, nk, D)


def kernel_scores(q: Tensor, means: Tensor, cand: Tensor | None = None) -> Tensor:
    """InfLLM v2's block scores: q (B, H, T, D), kernel means (B, K, NB, nk, D) -> (B, K, T, NB), per block the max
    over its kernels of softmax(q . kernel / sqrt(D)) over the kernels of all candidate blocks (cand (B, 1, T, NB);
    None: every block), summed over the query heads of each KV group; a query with no candidate scores zeros."""
    B, H, T, D = q.shape
    K = means.shape[1]
    logits = torch.einsum("bkgtd,bkjnd->bkgtjn", q.view(B, K, H // K, T, D), means) / math.sqrt(D)
    if cand is not None:
        logits = logits.masked_fill(~cand.unsqueeze(2).unsqueeze(-1), float("-inf"))
    p = logits.flatten(-2).softmax(-1).view_as(logits).nan_to_num(0.0)
    return p.amax(-1).sum(2)


class SparseCache(nn.Module):
    """A sparse layer's KV cache, keyed by position per row and KV head: `kpos` (B, K, slots) is each slot's position
    (-1: empty). Slots by pattern: the sink tokens; a ring of `window` tokens (slot sink + p % window); for s2 also
    each head's own strided blocks (every key it may read later); for infllm2 every position (and the kernel means of
    its full blocks), of which a decode step reads only the selected blocks. Tokens a row does not keep (padding) go
    to a last scratch slot that is never read."""

    def __init__(self, attn: Pattern, batch: int, max_len: int, dtype: torch.dtype, device=None):
        super().__init__()
        sp, K, D = attn.sp, attn.n_kv_heads, attn.head_dim
        self.sp = sp
        if sp.pattern == "infllm2":
            slots = max_len
        else:
            slots = sp.sink + sp.window
            if sp.pattern == "s2":
                slots += math.ceil(max_len / sp.block / sp.vert_stride) * sp.block
        self.slots = slots
        self.register_buffer("k", torch.zeros(batch, K, slots + 1, D, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, K, slots + 1, D, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "kpos", torch.full((batch, K, slots + 1), -1, dtype=torch.long, device=device), persistent=False
        )
        if sp.pattern == "infllm2":
            nk = (sp.block - sp.kernel) // sp.kernel_stride + 1
            nb = max_len // sp.block
            self.register_buffer(
                "means", torch.zeros(batch, K, nb, nk, D, dtype=dtype, device=device), persistent=False
            )
        self.offset = attn.offset(device)
        self.is_store = torch.zeros(slots + 1, dtype=torch.bool, device=device)  # (slots + 1,) s2's strided slots
        self.is_store[sp.sink + sp.window : slots] = True
        self.heads, self.shift = attn.n_kv_heads, attn.step

    def prepare(self, end: int) -> bool:
        return False  # the fused dense decode op would read every slot

    def _slot(self, pos: Tensor, keep: Tensor) -> Tensor:
        """Ring/sink slot of positions pos (B, T) kept by `keep` (B, T) -> (B, 1, T); the scratch slot otherwise."""
        sp = self.sp
        if sp.pattern == "infllm2":
            slot = pos
        else:
            last = torch.where(keep, pos, -1).amax(1, keepdim=True)  # (B, 1)
            keep = keep & ((pos < sp.sink) | (pos > last - sp.window))  # a chunk longer than the ring: its tail
            slot = torch.where(pos < sp.sink, pos, sp.sink + pos % sp.window)
        return torch.where(keep, slot, self.slots).unsqueeze(1)

    def _write(self, slot: Tensor, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Keys/values (B, K, T, D) into slots (B, 1 or K, T); later tokens win where a chunk reuses a ring slot."""
        B, K, T, D = k.shape
        slot = slot.expand(B, K, T)
        self.k.scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, D), k)
        self.v.scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, D), v)
        self.kpos.scatter_(2, slot, pos.unsqueeze(1).expand(B, K, T))
        self.kpos[:, :, self.slots] = -1

    def step(self, q: Tensor, k: Tensor, v: Tensor, p: int) -> Tensor:
        """One token of every row at position p (no padding), static patterns: written first (its ring slot held a
        token no later query reads), then SDPA over the slots the pattern allows. q (B, H, 1, D), k, v (B, K, 1, D)."""
        sp = self.sp
        slot = p if p < sp.sink else sp.sink + p % sp.window
        self.k.narrow(2, slot, 1).copy_(k)
        self.v.narrow(2, slot, 1).copy_(v)
        self.kpos.narrow(2, slot, 1).fill_(p)
        qb = p // sp.block
        if sp.pattern == "s2" and p >= sp.sink:
            s = sp.sink + sp.window + (qb // sp.vert_stride) * sp.block + p % sp.block
            for h in range(self.heads):
                if (qb + h * self.shift) % sp.vert_stride == 0:  # on head h's stride: kept for good
                    self.k[:, h, s], self.v[:, h, s], self.kpos[:, h, s] = k[:, h, 0], v[:, h, 0], p
        lo = max(0, (qb - sp.local_blocks + 1) * sp.block)  # the local window's first position
        kpos = self.kpos  # (B, K, slots + 1)
        ok = (kpos >= lo) | ((kpos >= 0) & (kpos < sp.sink))
        if sp.pattern == "s2":
            ok = torch.where(self.is_store, (kpos >= 0) & (kpos < lo), ok)
        return sdpa_per_kv_head(q, self.k, self.v, ok.unsqueeze(2))

    def step_selected(self, attn: Pattern, q: Tensor, k: Tensor, v: Tensor, p: int) -> Tensor:
        """infllm2, one token of every row at position p (no padding): the sink, the selected whole blocks and the
        local window are contiguous or whole-block reads, so SDPA needs no mask. q (B, H, 1, D), k, v (B, K, 1, D)."""
        sp, (B, H, _, D) = self.sp, q.shape
        self.k.narrow(2, p, 1).copy_(k)
        self.v.narrow(2, p, 1).copy_(v)
        self.kpos.narrow(2, p, 1).fill_(p)
        bs, qb, K = sp.block, p // sp.block, self.heads
        if (p + 1) % bs == 0:  # this token completes its block
            self._complete(qb)
        lo = max(0, qb - sp.local_blocks + 1) * bs  # the local window's first position
        first, last = sp.sink_blocks, qb - sp.local_blocks  # candidate blocks (whole, outside sink and window)
        want = min(sp.topk - sp.sink_blocks - (qb + 1 - lo // bs), last - first + 1)
        if p < sp.dense_len or p < sp.sink + sp.window or want <= 0 or last < first:
            ks, vs, n = self.k[:, :, : p + 1], self.v[:, :, : p + 1], qb + 1  # every key (below dense_len, early)
            if p >= sp.dense_len and lo > sp.sink:  # early, the window does not reach the sink
                ks = torch.cat([self.k[:, :, : sp.sink], self.k[:, :, lo : p + 1]], 2)
                vs = torch.cat([self.v[:, :, : sp.sink], self.v[:, :, lo : p + 1]], 2)
                n = sp.sink_blocks + qb + 1 - lo // bs
        else:
            score = kernel_scores(q, self.means[:, :, first : last + 1])[:, :, 0]  # (B, K, nc): the candidates
            top = score.topk(want, dim=-1).indices.sort(-1).values + first  # (B, K, want) block ids
            # the selected blocks' token rows in the flat (B * K * (slots + 1), D) cache (a view: no copy of it)
            base = torch.arange(B * K, device=q.device).view(B, K, 1, 1) * (self.slots + 1)
            rows = (base + top.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).flatten()
            kb = self.k.view(-1, D).index_select(0, rows).view(B, K, -1, D)
            vb = self.v.view(-1, D).index_select(0, rows).view(B, K, -1, D)
            ks = torch.cat([self.k[:, :, : sp.sink], kb, self.k[:, :, lo : p + 1]], 2)
            vs = torch.cat([self.v[:, :, : sp.sink], vb, self.v[:, :, lo : p + 1]], 2)
            n = sp.sink_blocks + want + qb + 1 - lo // bs
        attn.blocks_read[0] += n * K * B
        attn.blocks_read[1] += (qb + 1) * K * B
        return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=H != K)

    def attend(self, attn: Pattern, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, mask: Tensor | None) -> Tensor:
        """Attention of new tokens q (B, H, T, D) at qpos against this cache and each other; then they are cached.
        mask: generation's (B, 1, T, S) slot mask; its last row marks the new tokens that are real (not padding)."""
        B, T = q.shape[0], q.shape[2]
        qpos = qpos.expand(B, -1)
        keep = mask[:, 0, -1, -T:] if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        if self.sp.pattern == "infllm2":
            self.store(qpos, keep, k, v)
            return self._attend_selected(attn, q, qpos, keep)
        ck, cv, cpos = self.k, self.v, self.kpos  # (B, K, slots + 1, D), (B, K, slots + 1)
        npos = torch.where(keep, qpos, -1).unsqueeze(1).expand(-1, ck.shape[1], -1)
        allow = self._allow(attn, qpos, torch.cat([cpos, npos], 2))  # (B, K, T, S)
        allow[..., 0] |= ~keep.unsqueeze(1)  # a padding query reads something harmless (never a NaN)
        y = sdpa_per_kv_head(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), allow)
        self.store(qpos, keep, k, v)
        return y

    def store(self, qpos: Tensor, keep: Tensor, k: Tensor, v: Tensor) -> None:
        """Cache the new tokens' keys and values (B, K, T, D) at positions qpos (B, T); `keep`: the real ones."""
        self._write(self._slot(qpos, keep), qpos, k, v)
        if self.sp.pattern == "s2":
            self._write_strided(qpos, keep, k, v)
        if self.sp.pattern == "infllm2":
            self._update_means(qpos, keep)

    def _allow(self, attn: Pattern, qpos: Tensor, kpos: Tensor) -> Tensor:
        """(B, K, T, S): which of the cached slots (then the new tokens) at kpos each query reads. Ring and sink
        slots follow the local and sink rules; strided slots (s2) only outside the local window (inside it the ring
        holds the same token); the new tokens the whole rule."""
        sp = self.sp
        qb = (qpos // sp.block).view(qpos.shape[0], 1, -1, 1)  # (B, 1, T, 1)
        kb = (kpos // sp.block).unsqueeze(2)  # (B, K, 1, S)
        new = kpos.shape[-1] - self.is_store.shape[0]
        region = torch.cat([self.is_store.long(), self.is_store.new_full((new,), 2, dtype=torch.long)])  # 2: new
        local = ((qb - kb) < sp.local_blocks) | (kb < sp.sink_blocks)
        full = attn.static(qb, kb)
        ok = torch.where(region == 0, local, torch.where(region == 1, full & ~local, full))
        return ok & (kpos.unsqueeze(2) >= 0) & (kpos.unsqueeze(2) <= qpos.view(qpos.shape[0], 1, -1, 1))

    def _write_strided(self, qpos: Tensor, keep: Tensor, k: Tensor, v: Tensor) -> None:
        """s2: tokens on a head's stride also go to that head's strided slots (kept for the whole context)."""
        sp = self.sp
        kb = (qpos // sp.block).unsqueeze(1)  # (B, 1, T)
        on = (
            ((kb + self.offset.view(1, -1, 1)) % sp.vert_stride == 0)
            & keep.unsqueeze(1)
            & (qpos.unsqueeze(1) >= sp.sink)
        )
        slot = sp.sink + sp.window + (kb // sp.vert_stride) * sp.block + qpos.unsqueeze(1) % sp.block  # (B, K, T)
        self._write(torch.where(on, slot, self.slots), qpos, k, v)

    def _update_means(self, qpos: Tensor, keep: Tensor) -> None:
        """infllm2: kernel means of the blocks the new tokens completed (in a row's partial or future block they are
        never read: only whole blocks before the local window are scored)."""
        bs = self.sp.block
        if qpos.shape[1] > 1:
            full = (int(qpos.max()) + 1) // bs
            self.means[:, :, :full] = kernel_means(self.k[:, :, : full * bs], self.sp)
            return
        for b in ((qpos[:, 0] + 1) % bs == 0).nonzero().flatten().tolist():
            self._complete(int(qpos[b, 0]) // bs, slice(b, b + 1))

    def _complete(self, j: int, rows: slice = slice(None)) -> None:
        """infllm2: the kernel means of block j, now whole (in `rows` of the batch)."""
        bs = self.sp.block
        self.means[rows, :, j] = kernel_means(self.k[rows, :, j * bs : (j + 1) * bs], self.sp)[:, :, 0]

    def _attend_selected(self, attn: Pattern, q: Tensor, qpos: Tensor, keep: Tensor) -> Tensor:
        """infllm2: each query reads the blocks `select` picks for it, gathered from the cache."""
        sp, (B, _, T, D) = self.sp, q.shape
        end = int(qpos.max()) + 1
        nb = -(-end // sp.block)
        sel = attn.select(q, qpos, nb, self.means[:, :, : end // sp.block])  # (B, K, T, NB)
        attn.count(sel, qpos)
        blocks = sel.any(2)  # (B, K, NB)
        m = int(blocks.sum(-1).max())
        order = blocks.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :m]  # (B, K, m)
        slot = (order.unsqueeze(-1) * sp.block + torch.arange(sp.block, device=q.device)).flatten(-2)  # (B, K, m*bs)
        slot = slot.clamp(max=self.slots)
        idx = slot.unsqueeze(-1).expand(-1, -1, -1, D)
        kg, vg, kpos = self.k.gather(2, idx), self.v.gather(2, idx), self.kpos.gather(2, slot)
        kb_g = (kpos // sp.block).clamp(min=0).unsqueeze(2).expand(-1, -1, T, -1)
        allow = sel.gather(-1, kb_g) & (kpos.unsqueeze(2) >= 0) & (kpos.unsqueeze(2) <= qpos.view(B, 1, T, 1))
        allow[..., 0] |= ~keep.unsqueeze(1)  # a padding query reads something harmless (never a NaN)
        return sdpa_per_kv_head(q, kg, vg, allow)


def sdpa_per_kv_head(q: Tensor, k: Tensor, v: Tensor, allow: Tensor) -> Tensor:
    """SDPA of q (B, H, T, D) over per-KV-head keys (B, K, S, D) with a per-KV-head mask (B, K, T, S)."""
    G = q.shape[1] // k.shape[1]
    B, K, T, S = allow.shape
    y = F.scaled_dot_product_attention(
        q.reshape(B, K, G * T, -1), k, v, attn_mask=allow.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(B, K, G * T, S)
    )
    return y.view(B, q.shape[1], T, -1)
