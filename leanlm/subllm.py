"""SUBLLM (arXiv 2406.06571, XiaoMi/subllm): the decoder subsamples its token sequence for the middle layers.

A structure string drives the layer stack: `T` = a baseline decoder block, `(` = subsample, `)` = upsample + bypass.
The paper's 24-layer model is `TTTTT(TTTTT(TTTT)TTTTT)TTTTT`, keeping 64% of the tokens at each `(`.

    (  score s_t = w . x_t (a bias-free linear layer on the residual stream), keep some tokens in their original order
       training:  the top k = (T + df - 1) // df (df = 1/keep), weight = clamp(s, 0, 1) - clamp(paired discarded s)
       inference: every token with s > threshold (0), weight = clamp(s, 0, 1)
    )  kept:    out = x + b * w * (y - x)      (upsampling u = w y + (1 - w) x, then bypass x + b (u - x))
       dropped: out = x                        (the token skipped the whole segment)

x is the stream that entered the matching `(`, y what the inner blocks made of it, b a learned per-channel scale.
Kept tokens keep their original absolute RoPE positions in every nested stage. A gradient-only Balancer pushes the
fraction of positive scores towards `keep`, so that the inference threshold keeps about as many tokens as training's
top-k; `set_step` feeds the trainer's step to its schedules. In generation each subsampled layer caches only the
tokens it processed, per row, so batched generation is exact for every row (the official code is exact at batch 1).

Shapes: B batch, T tokens at the current level, k kept tokens, C width, L cache slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.config import ModelConfig, SubLLMConfig
from leanlm.errors import LeanLMError
from leanlm.model import KVCache, Transformer, dense_flops_per_token


def parse_structure(structure: str) -> list[tuple[str, int]]:
    """`T(T)T` -> [("T", 0), ("(", 0), ("T", 1), (")", 0), ("T", 2)]: block index or stage index per character.

    Stages are numbered in order of their `(`; `)` closes the innermost open stage. Validity is checked by
    SubLLMConfig.check.
    """
    ops, open_, n_blocks, n_stages = [], [], 0, 0
    for ch in structure:
        if ch == "T":
            ops.append(("T", n_blocks))
            n_blocks += 1
        elif ch == "(":
            ops.append(("(", n_stages))
            open_.append(n_stages)
            n_stages += 1
        else:
            ops.append((")", open_.pop()))
    return ops


def kept_length(T: int, keep: float) -> int:
    """Tokens a training-time `(` keeps of T: icefall's (T + df - 1) // df with df = 1/keep (2048 -> 1311 -> 839)."""
    df = 1.0 / keep
    return max(1, min(T, int((T + df - 1) // df)))


def linear_schedule(values: list, steps: int, step: int) -> float:
    """Linear from values[0] at step 0 to values[1] at `steps`, constant after (icefall's ScheduledFloat)."""
    a, b = float(values[0]), float(values[1])
    return a + (b - a) * min(step / steps, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# gradient-only modules (icefall's Balancer and limit_param_value, as SUBLLM's official code copies them)


class _Balance(torch.autograd.Function):
    """Identity forward. Backward adds grad_scale * |g| * (unit-RMS gradient of a penalty on the score statistics):
    penalty = |m - clamp(m, m_min, m_max)| + |log(clamp(rms, r_min, r_max) / rms)|, m = mean/std over all tokens."""

    @staticmethod
    def forward(ctx, s: Tensor, bounds: tuple[float, float, float, float], grad_scale: float) -> Tensor:
        ctx.save_for_backward(s)
        ctx.bounds, ctx.grad_scale = bounds, grad_scale
        return s.view_as(s)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        (s,) = ctx.saved_tensors
        m_min, m_max, r_min, r_max = ctx.bounds
        with torch.enable_grad():
            x = s.detach().float().requires_grad_()
            mean, rms = x.mean(), x.square().mean().sqrt()
            m = mean / (rms.square() - mean.square()).clamp(min=1e-20).sqrt()
            penalty = (m - m.clamp(m_min, m_max)).abs() + (rms.clamp(r_min, r_max) / rms).log().abs()
            (pg,) = torch.autograd.grad(penalty, x)
        pg = pg * (ctx.grad_scale / pg.square().mean().sqrt().clamp(min=1e-20))
        gf = g.float()
        return (gf + gf.abs() * pg).to(g.dtype), None, None


class _LimitParam(torch.autograd.Function):
    """Identity forward; backward flips gradient signs that would push the parameter further outside [lo, hi]."""

    @staticmethod
    def forward(ctx, p: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(p)
        ctx.lo, ctx.hi = lo, hi
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        (p,) = ctx.saved_tensors
        g = torch.where((g > 0) & (p < ctx.lo), -g, g)  # below the bound: only steps that raise p
        g = torch.where((g < 0) & (p > ctx.hi), -g, g)  # above: only steps that lower it
        return g, None, None


def balancer_bounds(sub: SubLLMConfig) -> tuple[float, float, float, float]:
    """(m_min, m_max, r_min, r_max): the positive-fraction band keep +- band as bounds on mean/std (a Gaussian's
    P(s > 0) = p  <=>  mean/std = 0.8139535 atanh(2p - 1), icefall's approximation) and the mean-|score| band as
    bounds on the RMS (x 1.2533 = sqrt(pi/2))."""

    def m(p: float) -> float:
        return 0.8139535143 * math.atanh(min(max(2 * p - 1, -0.999), 0.999))

    lo, hi = sub.keep - sub.balancer_band, sub.keep + sub.balancer_band
    return m(lo), m(hi), 1.2533 * sub.balancer_min_abs, 1.2533 * sub.balancer_max_abs


class Stage(nn.Module):
    """The parameters of one `(`...`)` pair: the scorer and the bypass scale (upsampling has none)."""

    def __init__(self, dim: int, sub: SubLLMConfig):
        super().__init__()
        self.scorer = nn.Linear(dim, 1, bias=False)
        self.scorer.weight.lr_scale = sub.scorer_lr_scale  # read by leanlm.optim.param_groups
        self.bypass_scale = nn.Parameter(torch.full((dim,), sub.bypass_init))


class StageCache(KVCache):
    """A subsampled layer's KV cache: rows hold different numbers of tokens (only those the layer processed).

    When `slots` (B, k) is set, row b's new keys go to slots[b] instead of one shared range; the model sets it (and
    `end`, the number of slots to return) before running the segment's layers. The cache starts at the slots its
    stage is expected to need (SubLLM.setup_caches) and grows by half when a stage keeps more, up to `max_len`:
    the memory saved is the point of a smaller cache, and a threshold may keep any number of tokens.
    """

    slots: Tensor | None = None
    end: int = 0

    def __init__(self, batch: int, max_len: int, slots: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__(batch, min(slots, max_len), n_kv_heads, head_dim, dtype, device)
        self.max_len = max_len

    def _reserve(self, end: int) -> None:
        L = self.k.shape[2]
        if end <= L:
            return
        new = min(self.max_len, max(end, L + L // 2))
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = old.new_zeros(*old.shape[:2], new, old.shape[3])  # (B, K, new, D)
            buf.narrow(2, 0, L).copy_(old)
            setattr(self, name, buf)

    def prepare(self, end: int) -> bool:
        if self.slots is not None:
            return False
        self._reserve(end)
        return super().prepare(end)

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        if self.slots is None:
            self._reserve(start + k.shape[2])
            return super().update(k, v, start)
        self._reserve(self.end)
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
        self.k[rows, :, self.slots] = k.transpose(1, 2)  # (B, k, K, D) into (B, K, L, D) at per-row slots
        self.v[rows, :, self.slots] = v.transpose(1, 2)
        return self.k[:, :, : self.end], self.v[:, :, : self.end]


class SubLLM(Transformer):
    """A LLaMA decoder with SUBLLM's subsampling/upsampling/bypass stages; the baseline's blocks, names and init.

    Selection: top-k in training mode, the score threshold in eval mode; set `selection` to "topk" or "threshold"
    to force one (e.g. to compare both on one checkpoint). Without parentheses in the structure this is exactly the
    dense baseline.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.subllm is None:
            raise LeanLMError("SubLLM needs a model.subllm section")
        self.sub = cfg.subllm
        self.ops = parse_structure(self.sub.structure)
        n_stages = self.sub.structure.count("(")
        self.stages = nn.ModuleList(Stage(cfg.dim, self.sub) for _ in range(n_stages))
        self.depth_of_layer = []  # nesting depth of every block (0 = full sequence)
        self.parent = []  # stage index -> enclosing stage index (-1 = the full sequence)
        open_: list[int] = []
        for op, i in self.ops:
            if op == "T":
                self.depth_of_layer.append(len(open_))
            elif op == "(":
                self.parent.append(open_[-1] if open_ else -1)
                open_.append(i)
            else:
                open_.pop()
        self.stage_of_layer = [-1] * cfg.n_layers  # innermost stage containing each block
        for op, i in self.ops:
            if op == "(":
                open_.append(i)
            elif op == ")":
                open_.pop()
            else:
                self.stage_of_layer[i] = open_[-1] if open_ else -1
        self.stage_layers = [[i for i, st in enumerate(self.stage_of_layer) if st == j] for j in range(n_stages)]
        self.selection: str | None = None  # None: top-k when training, threshold in eval
        self.step = 0
        self._bounds = balancer_bounds(self.sub)
        self._stats: list[dict[str, Tensor]] = [{} for _ in range(n_stages)]
        # (kept, seen) since reset_retention; host-side bookkeeping, never on the meta/accelerator device
        self.retention_counts = torch.zeros(n_stages, 2, dtype=torch.float64, device="cpu")
        self._counts_np = self.retention_counts.numpy()  # the same memory (updated in place only)
        self._lens: list[list[int]] | None = None  # generation: tokens cached per stage and row
        self._scores: list[list[Tensor]] | None = None  # threshold-mode scores per stage, while calibrating
        self._stage_params: list[tuple[Tensor, Tensor]] | None = None  # (scorer weight, bypass scale) in decode_layout

    # -- construction -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> SubLLM:
        """The baseline's init for the blocks (identical to the dense twin's with the same seed), then the stages:
        scorers like a default nn.Linear (icefall's to_scores), bypass scales at `bypass_init`."""
        super().init_weights(seed)
        gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        bound = 1.0 / math.sqrt(self.cfg.dim)
        for st in self.stages:
            st.scorer.weight.copy_(torch.rand(st.scorer.weight.shape, generator=gen) * 2 * bound - bound)
            st.bypass_scale.fill_(self.sub.bypass_init)
        return self

    def calibrate(self, batches: Iterable[Tensor]) -> None:
        """The trainer's hook before validation: with `calibrate: true`, set the per-stage thresholds on `batches`."""
        if self.sub.calibrate:
            calibrate_thresholds(self, batches)

    def set_step(self, step: int) -> None:
        """Optimizer step, read by the balancer-probability and bypass-bound schedules (without it they stay at
        their step-0 values)."""
        self.step = step

    # -- cost accounting ----------------------------------------------------------------------------------------------

    def stage_lengths(self, T: int, retention: list[float] | None = None) -> list[float]:
        """Tokens at each stage's level for a T-token sequence: exact top-k lengths, or T * retained fractions."""
        lengths: list[float] = []
        for j, parent in enumerate(self.parent):
            outer = T if parent < 0 else lengths[parent]
            lengths.append(kept_length(int(outer), self.sub.keep) if retention is None else outer * retention[j])
        return lengths

    def flops_per_token(self, seq_len: int, training: bool = False, retention: list[float] | None = None) -> float:
        """Executed FLOPs per token (see Transformer.flops_per_token): each block runs on the tokens of its stage and
        attends to (n+1)/2 of them on average; plus the scorers. `retention` (kept fraction per stage, as measured
        at inference) replaces the training-time top-k lengths."""
        lengths = [*self.stage_lengths(seq_len, retention), seq_len]
        per_token = self._executed(lengths, [(n + 1) / 2 for n in lengths]) / seq_len
        return 3 * per_token if training else per_token

    def decode_flops(
        self, context: float, retention: list[float] | None = None, cached: list[float] | None = None
    ) -> float:
        """Executed FLOPs of one decode step (see Transformer.decode_flops). A step enters stage j with probability
        the product of `retention` up to j (the kept fraction of the decoded tokens per stage), and stage j's layers
        then attend to the `context` tokens times the product of `cached` (the kept fraction of everything in the
        caches, mostly the prompt; default `retention`). Without either: the training keep ratio."""
        r = retention or [self.sub.keep] * len(self.stages)
        enter = [*self.stage_lengths(1, r), 1.0]  # probability of reaching each stage
        keys = [*self.stage_lengths(context, cached or r), context]  # keys each stage's layers attend to
        return self._executed(enter, keys)

    def _executed(self, tokens: list[float], keys: list[float]) -> float:
        """FLOPs of the blocks, scorers and lm head when stage j's layers run on tokens[j] tokens that each attend to
        keys[j] keys; the last entry of both (index -1, the stage of an outer layer) is the full sequence."""
        cfg = self.cfg
        one_layer = cfg.replace(n_layers=1, subllm=None)
        head = 2 * cfg.dim * cfg.vocab_size
        total = head * tokens[-1]
        for st in self.stage_of_layer:
            total += tokens[st] * (dense_flops_per_token(one_layer, context=keys[st]) - head)
        for parent in self.parent:
            total += 2 * cfg.dim * tokens[parent]  # the scorer, on the tokens of the enclosing level
        return total

    def retention(self) -> list[float]:
        """Fraction of the tokens reaching each stage that it kept, over the forwards since `reset_retention`."""
        kept, seen = self.retention_counts.unbind(1)
        return (kept / seen.clamp(min=1)).tolist()

    def reset_retention(self) -> None:
        self.retention_counts.zero_()

    def train_metrics(self) -> dict[str, float]:
        """Per stage (s1 = the outermost `(`): fraction of positive scores (should sit in keep +- band), mean weight of
        the kept tokens (-> 1), mean clamped score of the discarded tokens (-> 0), bypass scale range, fraction kept."""
        out = {}
        for j, (st, stats) in enumerate(zip(self.stages, self._stats)):
            b = st.bypass_scale.detach()
            vals = {
                "pos_frac": stats.get("pos_frac"),
                "kept_w": stats.get("kept_w"),
                "disc_s": stats.get("disc_s"),
                "bypass_min": b.min(),
                "bypass_max": b.max(),
                "kept": stats.get("kept"),
            }
            for k, v in vals.items():
                out[f"s{j + 1}_{k}"] = float("nan") if v is None else float(v)
        return out

    # -- inference state ----------------------------------------------------------------------------------------------

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        super().setup_caches(batch, max_len, dtype)
        self._lens = [[0] * batch for _ in self.stages]

    def new_cache(self, layer: int, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        st = self.stage_of_layer[layer]
        if st < 0:
            return super().new_cache(layer, batch, max_len, dtype)
        # a stage keeps about `keep` of what reaches it: its caches start at that share (+ 64 slots, so that short
        # prompts and the first decoded tokens never reallocate) and StageCache grows them if a stage keeps more
        slots = math.ceil(self.stage_lengths(max_len, [self.sub.keep] * len(self.stages))[st]) + 64
        cfg, dev = self.cfg, self.embed_tokens.weight.device
        return StageCache(batch, max_len, slots, cfg.n_kv_heads, cfg.head_dim, dtype, dev)

    def reset_caches(self) -> None:
        super().reset_caches()
        self._lens = None

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        """The baseline's (final norm, lm head), plus the stages' parameters in a plain list for the one-token path:
        mid-step, `self.stages[j].scorer.weight` (three Module lookups) costs ~50 us (leanlm/kernels.cpp)."""
        with super().decode_layout(kernel):
            self._stage_params = [(st.scorer.weight.detach(), st.bypass_scale.detach()) for st in self.stages]
            try:
                yield
            finally:
                self._stage_params = None

    def _stage_param(self, j: int) -> tuple[Tensor, Tensor]:
        """Stage j's (scorer weight (1, C), bypass scale (C,)), from the plain list while in a decode layout."""
        if self._stage_params is not None:
            return self._stage_params[j]
        st = self.stages[j]
        return st.scorer.weight, st.bypass_scale

    # -- selection ----------------------------------------------------------------------------------------------------

    def _select_topk(self, j: int, s: Tensor) -> tuple[Tensor, Tensor]:
        """Training selection over scores s (B, T): indices (B, k) ascending and weights (B, k) in [0, 1]."""
        T = s.shape[1]
        k = kept_length(T, self.sub.keep)
        p = linear_schedule(self.sub.balancer_prob, self.sub.balancer_steps, self.step)
        if self.training and torch.is_grad_enabled() and random.random() < p:
            s = _Balance.apply(s, self._bounds, self.sub.balancer_grad_scale)
        s_sorted, order = s.sort(dim=1, descending=True)  # (B, T)
        clamped = s_sorted.clamp(0, 1)
        # pair the i-th best kept token with the i-th best discarded one (icefall): any positive discarded score
        # lowers a kept token's weight, so the loss pushes discarded scores below 0 and kept ones towards 1
        disc = clamped[:, k : 2 * k]  # (B, <=k)
        if disc.shape[1] < k:
            disc = torch.cat((disc, disc.new_zeros(disc.shape[0], k - disc.shape[1])), dim=1)
        if random.random() < 0.5:
            disc = disc.flip(1)
        w_sorted = clamped[:, :k] - disc  # (B, k)
        idx, perm = order[:, :k].sort(dim=1)  # back to the original order
        w = w_sorted.gather(1, perm)
        with torch.no_grad():
            self._stats[j] = {
                "pos_frac": (s > 0).float().mean(),
                "kept_w": w.mean(),
                "disc_s": clamped[:, k:].mean() if T > k else torch.zeros(()),
                "kept": torch.tensor(k / T),
            }
        return idx, w

    def _threshold(self, j: int) -> float:
        """Stage j's inference threshold v: one value for every stage, or one per stage."""
        v = self.sub.threshold
        return v[j] if isinstance(v, list) else v

    def _select_threshold(self, j: int, s: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Inference selection: keep s > threshold (never a pad). Returns indices (B, kmax) with each row's kept
        tokens first, in order, then filler; weights (B, kmax) (0 for filler); kept counts (B,)."""
        keep = s > self._threshold(j)  # (B, T)
        if valid is not None:
            keep &= valid
        counts = keep.sum(1)  # (B,)
        kmax = int(counts.max())
        order = keep.to(torch.int8).sort(dim=1, descending=True, stable=True).indices  # kept first, in order
        idx = order[:, :kmax]  # (B, kmax)
        real = torch.arange(kmax, device=s.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, kmax)
        w = s.gather(1, idx).clamp(0, 1) * real
        seen = valid.sum() if valid is not None else s.numel()
        if self._scores is not None:  # calibrate_thresholds is listening
            self._scores[j].append(s[valid] if valid is not None else s.flatten())
        with torch.no_grad():
            self._stats[j] = {"pos_frac": (s > 0).float().mean(), "kept_w": w.sum() / counts.sum().clamp(min=1)}
            self._stats[j]["kept"] = counts.sum() / max(int(seen), 1)
            self.retention_counts[j, 0] += float(counts.sum())
            self.retention_counts[j, 1] += float(seen)
        return idx, w, counts

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        idx: Tensor,
        pos: Tensor | None = None,
        start: int = 0,
        mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab), arguments as Transformer.forward. With a padded batch in generation, `mask`'s last
        query row marks the real tokens (leanlm.generate.pad_batch): pads are never selected."""
        B, T = idx.shape
        topk = self.training if self.selection is None else self.selection == "topk"
        if topk and self.caches is not None:
            raise LeanLMError("SUBLLM generation uses threshold selection (call model.eval())")
        x = self.embed(idx)  # (B, T, C)
        cos, sin, pos = self.rope_rows(pos, start, T, x)  # a decode step's int position waits for a gather (_subsample)
        if not isinstance(pos, int):
            pos = pos.expand(B, -1)
        valid = None if mask is None else mask[:, 0, -1, start : start + T]  # (B, T) real tokens
        # pos: (B, T) absolute positions, or the int p for positions p.. of every row
        level = {"x": x, "pos": pos, "cos": cos, "sin": sin, "start": start, "mask": mask, "valid": valid}
        stack: list[dict] = []
        skipping = 0  # > 0 while inside a stage that kept no token in any row: its blocks and inner stages are skipped
        layers = list(self.layers)  # a list: indexing a ModuleList costs microseconds, a decode step pays 24 of them
        for op, i in self.ops:
            if skipping:
                skipping += {"(": 1, ")": -1}.get(op, 0)
                if skipping == 0:  # the skipped stage's `)`: its output is its input
                    level = stack.pop()
                continue
            if op == "T":
                cache = self.caches[i] if self.caches is not None else None
                x, cos, sin, mask = level["x"], level["cos"], level["sin"], level["mask"]
                level["x"] = layers[i](x, cos, sin, cache, level["start"], mask)
            elif op == "(":
                level, skip = self._subsample(i, level, stack, topk)
                skipping = int(skip)
            else:
                level = self._upsample(i, level, stack)
        return self.logits(level["x"], last_only)  # (B, T, vocab)

    def _subsample(self, j: int, outer: dict, stack: list[dict], topk: bool) -> tuple[dict, bool]:
        x = outer["x"]  # (B, T, C)
        B, T, C = x.shape
        if not topk and B * T == 1 and outer["valid"] is None and self._scores is None:
            return self._subsample_one(j, outer, stack)
        s = self.stages[j].scorer(x).squeeze(-1).float()  # (B, T) scores
        if topk:
            idx, w = self._select_topk(j, s)
            counts = None
        else:
            idx, w, counts = self._select_threshold(j, s, outer["valid"])
        saved = {**outer, "idx": idx, "w": w}
        stack.append(saved)
        if idx.shape[1] == 0:  # no row kept a token (e.g. a dropped token in decoding): skip the whole segment
            return saved, True
        xg = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))  # (B, k, C)
        saved["xg"] = xg
        pos = outer["pos"]
        if isinstance(pos, int):
            pos = torch.arange(pos, pos + T, device=x.device).expand(B, -1)  # (B, T)
        pos = pos.gather(1, idx)  # (B, k) original absolute positions, composed across stages
        cos, sin = self.rope(pos, x.dtype)
        inner = {"x": xg, "pos": pos, "cos": cos, "sin": sin, "start": 0, "mask": None, "valid": None}
        if counts is not None:  # threshold selection: rows are padded to the longest with filler a nested `(` skips
            inner["valid"] = torch.arange(idx.shape[1], device=x.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, k)
        if self.caches is not None:  # generation: this stage's layers append each row's kept tokens to its cache
            inner.update(self._stage_cache_view(j, counts, idx.shape[1], x.device))
        return inner, False

    def _subsample_one(self, j: int, outer: dict, stack: list[dict]) -> tuple[dict, bool]:
        """Decoding one token of one row: the same rule as `_select_threshold` without its index bookkeeping (sort,
        gathers, scatter), which would cost more than a block at this size. The token either enters the stage as is
        (same position, same RoPE rows) or skips it. Every tensor op here costs a dispatch of several microseconds,
        as much as a block's share of the work a dropped token saves, so there are two: the score and its read (one
        call into the C++ kernels while in their decode layout: mid-step a PyTorch op costs ~0.1 ms, kernels.cpp)."""
        w_s = self._stage_param(j)[0]  # (1, C)
        x = outer["x"]  # (1, 1, C)
        score = self._ops.score(x, w_s) if self._ops is not None else float(F.linear(x, w_s))
        kept = score > self._threshold(j)
        counts = self._counts_np  # retention_counts, through numpy: no tensor op
        counts[j, 1] += 1.0
        counts[j, 0] += kept
        saved = {**outer, "one": j, "w": min(max(score, 0.0), 1.0)}  # "one": this stage took the fast path
        stack.append(saved)
        if not kept:
            return saved, True
        inner = {**outer, "start": 0, "valid": None}
        if self.caches is not None:
            inner["start"], inner["mask"] = self._lens[j][0], None
            self._lens[j] = [self._lens[j][0] + 1]
            for i in self.stage_layers[j]:
                if self.caches[i].slots is not None:  # (setting a module attribute is slow)
                    self.caches[i].slots = None
        return inner, False

    def _stage_cache_view(self, j: int, counts: Tensor, k: int, device: torch.device) -> dict:
        """Cache slots and attention mask for k new tokens per row at stage j: row b writes its tokens at slots
        lens[b].. and query i attends to slots <= lens[b] + i (its row's earlier tokens, then itself)."""
        lens = self._lens[j]
        layers = self.stage_layers[j]
        new = counts.tolist()
        self._lens[j] = [n + c for n, c in zip(lens, new)]
        if len(set(lens)) == 1:  # every row has cached the same number of tokens: one shared slot range
            for i in layers:
                self.caches[i].slots = None
            return {"start": lens[0], "mask": None}
        base = torch.tensor(lens, device=device).unsqueeze(1)  # (B, 1)
        slots = base + torch.arange(k, device=device).unsqueeze(0)  # (B, k)
        end = max(lens) + k
        for i in layers:
            self.caches[i].slots, self.caches[i].end = slots, end
        mask = torch.arange(end, device=device).view(1, 1, end) <= slots.unsqueeze(-1)  # (B, k, L)
        return {"start": 0, "mask": mask.unsqueeze(1)}

    def _upsample(self, j: int, inner: dict, stack: list[dict]) -> dict:
        outer = stack.pop()
        if outer.get("one") == j:  # the single kept token of _subsample_one: x + w * b * (y - x), in two ops (or one)
            b = self._stage_param(j)[1]  # (C,)
            x, y, w = outer["x"], inner["x"], outer["w"]
            outer["x"] = torch.addcmul(x, b, y - x, value=w) if self._ops is None else self._ops.upsample(x, y, b, w)
            return outer
        x, idx, w, xg = outer["x"], outer["idx"], outer["w"], outer["xg"]
        scale = self.stages[j].bypass_scale  # (C,)
        if self.training and torch.is_grad_enabled() and random.random() < self.sub.bypass_limit_prob:
            lo = linear_schedule(self.sub.bypass_min, self.sub.bypass_steps, self.step)
            scale = _LimitParam.apply(scale, lo, 1.0)
        # kept: x + b * (u - x) with u = w y + (1 - w) x, i.e. x + b * w * (y - x); dropped tokens stay x
        delta = scale * w.unsqueeze(-1) * (inner["x"] - xg)  # (B, k, C)
        outer["x"] = x.scatter_add(1, idx.unsqueeze(-1).expand_as(delta), delta.to(x.dtype))
        return outer


@torch.no_grad()
def calibrate_thresholds(model: SubLLM, batches: Iterable[Tensor]) -> list[float]:
    """Per-stage inference thresholds v_j such that each stage keeps `keep` of the tokens reaching it on `batches`
    (token ids (B, T)), set on the model's config and returned.

    Stages are calibrated outermost first: which tokens reach an inner stage depends on the outer thresholds. With
    a calibrated balancer v = 0 already does this (the paper); short runs leave the positive fraction below the
    band (docs/results.md), and this sets v from the scores instead.
    """
    batches = list(batches)
    n = len(model.stages)
    v: list[float] = [0.0] * n
    was_training, selection = model.training, model.selection
    model.eval()
    model.selection = "threshold"
    try:
        for j in range(n):  # an enclosing stage has a lower index than the stages inside it
            _set_threshold(model, list(v))
            model._scores = [[] for _ in range(n)]
            for x in batches:
                model(x)
            s = torch.cat(model._scores[j]).float()  # the scores of every token that reached stage j
            drop = round((1 - model.sub.keep) * s.numel())
            v[j] = float(s.kthvalue(drop).values) if drop >= 1 else float(s.min()) - 1.0  # s > v for the rest
        _set_threshold(model, v)
    finally:
        model._scores = None
        model.selection = selection
        model.train(was_training)
    return v


def _set_threshold(model: SubLLM, v: list[float]) -> None:
    model.sub = dataclasses.replace(model.sub, threshold=v)
    model.cfg = model.cfg.replace(subllm=model.sub)  # saved with the checkpoint
