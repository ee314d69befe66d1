"""SUBLLM (arXiv 2406.06571, XiaoMi/subllm): the decoder subsamples its token sequence for the middle layers.

A structure string places the stages in the layer stack: `T` = a baseline decoder block, `(` = subsample, `)` =
upsample + bypass. The paper's 24-layer model is `TTTTT(TTTTT(TTTT)TTTTT)TTTTT`, keeping 64% of the tokens at each `(`.

    (  score s_t = w . x_t (a bias-free linear layer on the residual stream), keep some tokens in their original order
       training:  the top k = (T + df - 1) // df (df = 1/keep), weight = clamp(s, 0, 1) - clamp(paired discarded s)
       inference: every token with s > threshold (0), weight = clamp(s, 0, 1)
    )  kept:    out = x + b * w * (y - x)      (upsampling u = w y + (1 - w) x, then bypass x + b (u - x))
       dropped: out = x                        (the token skipped the whole segment)

x is the stream that entered the matching `(`, y what the inner blocks made of it, b a learned per-channel scale.
Kept tokens keep their original absolute RoPE positions in every nested stage. A gradient-only Balancer pushes the
fraction of positive scores towards `keep`, so that the inference threshold keeps about as many tokens as training's
top-k. In generation each subsampled layer caches only the tokens it processed, per row, so batched generation is
exact for every row. SUBLLM is the model's token router: `enter` opens the stages that start before a block, `leave`
closes those that end after it.

Shapes: B batch, T tokens at the current level, k kept tokens, C width, L cache slots.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.errors import LeanLMError
from leanlm.methods.base import Method
from leanlm.model import KVCache, ModelConfig, Stream, TokenRouter, Transformer

STRUCTURE_CHARS = set("T()")
PAPER_STRUCTURE = "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"  # SUBLLM's released 24-layer model


@dataclass
class SubLLMConfig:
    """The `model.subllm` section: where tokens are subsampled and restored, and the balancer/bypass schedules.

    `structure`: `T` = a decoder block, `(` = subsample (score, keep the top fraction), `)` = upsample + bypass.
    Defaults are the official code's; the step counts of the schedules are optimizer steps (docs/design.md).
    """

    structure: str = ""
    keep: float = 0.64  # fraction of tokens each `(` keeps (training: exactly k = (T + 1/keep - 1) // (1/keep))
    # inference keeps a token iff its score > v (the paper's v): one number for every stage, or one per `(` in
    # structure order, as `calibrate` sets them to reach `keep` on held-out text
    threshold: float | list = 0.0
    # true: training calibrates `threshold` per stage on training windows before every validation, so that each
    # keeps `keep` of the tokens. On by default, a measured change from the paper's fixed v = 0: the balancer makes
    # v = 0 keep `keep` only after far longer training than ours (0.31 / 0.27 kept; docs/design.md)
    calibrate: bool = True
    balancer_band: float = 0.05  # the balancer pushes the fraction of positive scores into keep +- band
    balancer_min_abs: float = 1.0  # ... and the mean |score| into [min_abs, max_abs]
    balancer_max_abs: float = 4.0
    balancer_grad_scale: float = 0.04
    balancer_prob: list = field(default_factory=lambda: [1.0, 0.25])  # applied with this probability, linear ...
    balancer_steps: int = 8000  # ... from the first to the second value over this many steps
    bypass_init: float = 0.5  # per-channel bypass scale s: out = x + s * (upsampled - x)
    bypass_min: list = field(default_factory=lambda: [0.9, 0.2])  # lower bound of s, linear over bypass_steps
    bypass_steps: int = 20000
    bypass_limit_prob: float = 0.6  # the bound is enforced (gradient sign flip) on this fraction of steps
    scorer_lr_scale: float = 0.5  # the scorers learn at this multiple of the base learning rate

    def check(self, model_cfg: ModelConfig) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.subllm.{name}: {why} (got {getattr(self, name)!r})")

        s = self.structure
        if not isinstance(s, str) or not s or set(s) - STRUCTURE_CHARS:
            raise bad("structure", "must be a non-empty string of T, ( and )")
        depth, own = 0, [0]  # own[d]: blocks directly inside the stage at depth d
        for i, ch in enumerate(s):
            if ch == "(":
                depth += 1
                own.append(0)
            elif ch == ")":
                if depth == 0:
                    raise bad("structure", f"unbalanced ')' at character {i}")
                if own.pop() == 0:
                    raise bad("structure", f"empty stage ending at character {i} (a stage needs at least one T)")
                depth -= 1
            else:
                own[-1] += 1
        if depth:
            raise bad("structure", f"{depth} unclosed '('")
        if s.count("T") != model_cfg.n_layers:
            raise bad("structure", f"has {s.count('T')} blocks but model.n_layers={model_cfg.n_layers}")
        if not isinstance(self.keep, float) or not 0 < self.keep <= 1:
            raise bad("keep", "must be in (0, 1]")
        v = self.threshold
        if isinstance(v, list) and (
            len(v) != s.count("(") or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
        ):
            raise bad("threshold", f"must be a number or a list of {s.count('(')} numbers, one per stage")
        for name in ("balancer_prob", "bypass_min"):
            v = getattr(self, name)
            if len(v) != 2 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
                raise bad(name, "must be [start, end] with values in [0, 1]")
        for name, ok, why in (
            ("balancer_steps", self.balancer_steps >= 1, "must be >= 1"),
            ("bypass_steps", self.bypass_steps >= 1, "must be >= 1"),
            ("balancer_band", self.keep == 1 or 0 < self.balancer_band < self.keep, "must be in (0, keep)"),
            ("balancer_min_abs", 0 < self.balancer_min_abs < self.balancer_max_abs, "must be in (0, balancer_max_abs)"),
            ("bypass_init", 0 <= self.bypass_init <= 1, "must be in [0, 1]"),
            ("bypass_limit_prob", 0 <= self.bypass_limit_prob <= 1, "must be in [0, 1]"),
            ("scorer_lr_scale", self.scorer_lr_scale > 0, "must be positive"),
        ):
            if not ok:
                raise bad(name, why)


def topk_length(T: int, keep: float) -> int:
    """Tokens a training-time `(` keeps of T: icefall's (T + df - 1) // df with df = 1/keep (2048 -> 1311 -> 839)."""
    df = 1.0 / keep
    return max(1, min(T, int((T + df - 1) // df)))


def linear_schedule(values: list, steps: int, step: int) -> float:
    """Linear from values[0] at step 0 to values[1] at `steps`, constant after (icefall's ScheduledFloat)."""
    a, b = float(values[0]), float(values[1])
    return a + (b - a) * min(step / steps, 1.0)


# gradient-only functions: icefall's Balancer and limit_param_value, as SUBLLM's official code copies them


class _GradOnly(torch.autograd.Function):  # identity forward; backward replaces the gradient g of x by fn(x, g)
    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return ctx.fn(x, g), None


def balance(s: Tensor, bounds: tuple[float, float, float, float], grad_scale: float) -> Tensor:
    """s, whose gradient gets grad_scale * |g| * (unit-RMS gradient of a penalty on the score statistics) added:
    penalty = |m - clamp(m, m_min, m_max)| + |log(clamp(rms, r_min, r_max) / rms)|, m = mean/std over all tokens."""

    def grad(s: Tensor, g: Tensor) -> Tensor:
        m_min, m_max, r_min, r_max = bounds
        with torch.enable_grad():
            x = s.detach().float().requires_grad_()
            mean, rms = x.mean(), x.square().mean().sqrt()
            m = mean / (rms.square() - mean.square()).clamp(min=1e-20).sqrt()
            penalty = (m - m.clamp(m_min, m_max)).abs() + (rms.clamp(r_min, r_max) / rms).log().abs()
            (pg,) = torch.autograd.grad(penalty, x)
        pg = pg * (grad_scale / pg.square().mean().sqrt().clamp(min=1e-20))
        gf = g.float()
        return (gf + gf.abs() * pg).to(g.dtype)

    return _GradOnly.apply(s, grad)


def limit(p: Tensor, lo: float, hi: float) -> Tensor:
    """p, whose gradient signs are flipped where they would push it further outside [lo, hi]."""

    def grad(p: Tensor, g: Tensor) -> Tensor:
        g = torch.where((g > 0) & (p < lo), -g, g)  # below the bound: only steps that raise p
        return torch.where((g < 0) & (p > hi), -g, g)  # above: only steps that lower it

    return _GradOnly.apply(p, grad)


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
        self.bypass_scale = nn.Parameter(torch.full((dim,), sub.bypass_init))


class StageCache(KVCache):
    """A subsampled layer's KV cache: rows hold different numbers of tokens (only those the layer processed).

    When `slots` (B, k) is set, row b's new keys go to slots[b] instead of one shared range (and `end` says how many
    slots to return). It starts at the slots its stage is expected to need and grows by half when a stage keeps
    more, up to `max_len`: a threshold may keep any number of tokens.
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


class SubLLM(Method, TokenRouter):
    """SUBLLM's stages on the baseline's blocks: the method (training hooks, calibration, reports) and the model's
    token router. Selection: top-k in training mode, the score threshold in eval mode; `selection` = "topk" or
    "threshold" forces one. Without parentheses in the structure the model is exactly the dense baseline."""

    name = "subllm"
    Config = SubLLMConfig

    def __init__(self, cfg: SubLLMConfig):
        super().__init__(cfg)
        # stages are numbered in the order of their `(`; a `)` closes the innermost open one
        n_layers, n_stages = cfg.structure.count("T"), cfg.structure.count("(")
        self.parent: list[int] = []  # stage index -> enclosing stage index (-1 = the full sequence)
        self.stage_of_layer = [-1] * n_layers  # innermost stage containing each block
        self.opens: list[list[int]] = [[] for _ in range(n_layers)]  # stages opening before block i, outermost first
        self.closes: list[list[int]] = [[] for _ in range(n_layers)]  # stages closing after block i, innermost first
        open_: list[int] = []
        blocks = 0  # blocks so far
        for ch in cfg.structure:
            if ch == "T":
                self.stage_of_layer[blocks] = open_[-1] if open_ else -1
                blocks += 1
            elif ch == "(":
                self.parent.append(open_[-1] if open_ else -1)
                open_.append(len(self.parent) - 1)
                self.opens[blocks].append(open_[-1])  # a stage holds a block, so one follows
            else:
                self.closes[blocks - 1].append(open_.pop())
        self.stage_layers = [[i for i, st in enumerate(self.stage_of_layer) if st == j] for j in range(n_stages)]
        self.selection: str | None = None  # None: top-k when training, threshold in eval
        self.step = 0
        self.model: Transformer | None = None
        self.stages: nn.ModuleList | None = None
        self._stats: list[dict[str, Tensor]] = [{} for _ in range(n_stages)]
        # (kept, seen) per stage since reset_stats, for prefills (several tokens per row) and decode steps (one)
        self.counts = {kind: np.zeros((n_stages, 2)) for kind in ("prefill", "decode")}
        self._topk = False  # this forward's selection
        self._kind_counts = self.counts["prefill"]  # this forward's counters
        self._lens: list[list[int]] | None = None  # generation: tokens cached per stage and row
        self._scores: list[list[Tensor]] | None = None  # threshold-mode scores per stage, while calibrating
        self._stage_params: list[tuple[Tensor, Tensor]] | None = None  # (scorer weight, bypass scale) in decode_layout
        self._ops = None  # the C++ kernels, in a cpp decode layout

    # -- the method ---------------------------------------------------------------------------------------------------

    def token_router(self) -> TokenRouter:
        return self

    def attach(self, model: Transformer) -> None:
        self.model = model
        model.stages = self.stages = nn.ModuleList(Stage(model.cfg.dim, self.cfg) for _ in self.parent)

    @torch.no_grad()
    def init_weights(self, model: Transformer, seed: int | None) -> None:
        """Scorers like a default nn.Linear (icefall's to_scores), bypass scales at `bypass_init`; the blocks got the
        baseline's init, identical to the dense twin's with the same seed."""
        gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        bound = 1.0 / math.sqrt(model.cfg.dim)
        for st in self.stages:
            st.scorer.weight.copy_(torch.rand(st.scorer.weight.shape, generator=gen) * 2 * bound - bound)
            st.bypass_scale.fill_(self.cfg.bypass_init)

    def lr_scales(self, model: Transformer) -> dict[str, float]:
        return {f"stages.{j}.scorer.weight": self.cfg.scorer_lr_scale for j in range(len(self.parent))}

    def set_step(self, model: Transformer, step: int) -> None:  # read by the balancer and bypass-bound schedules
        self.step = step

    def train_metrics(self, model: Transformer) -> dict[str, float]:
        """Per stage (s1 = the outermost `(`): fraction of positive scores (should sit in keep +- band), mean weight of
        the kept tokens (-> 1), mean clamped score of the discarded tokens (-> 0), bypass scale range, fraction kept."""
        out = {}
        for j, (st, stats) in enumerate(zip(self.stages, self._stats)):
            b = st.bypass_scale.detach()
            vals = {**stats, "bypass_min": b.min(), "bypass_max": b.max()}
            for k in ("pos_frac", "kept_w", "disc_s", "bypass_min", "bypass_max", "kept"):
                out[f"s{j + 1}_{k}"] = float("nan") if vals.get(k) is None else float(vals[k])
        return out

    def calibrate(self, model: Transformer, batches: list[Tensor]) -> dict[str, Any]:
        """With `calibrate: true`, per-stage inference thresholds that keep `keep` of the tokens on `batches`."""
        if not self.cfg.calibrate:
            return {}
        return {"subllm.threshold": calibrate_thresholds(self, batches)}

    def reset_stats(self, model: Transformer) -> None:
        for c in self.counts.values():
            c.fill(0)

    def retention(self, kind: str) -> list[float] | None:
        """Per stage, the fraction kept of the tokens reaching it in prefills or decode steps since reset_stats."""
        kept, seen = self.counts[kind].T
        return (kept / np.maximum(seen, 1)).tolist() if seen.any() else None

    def report(self, model: Transformer) -> dict[str, Any]:
        kept = {kind: self.retention(kind) for kind in self.counts}
        parts = [f"{k} {', '.join(f'{x:.3f}' for x in v)}" for k, v in kept.items() if v is not None]
        summary = f"SUBLLM: fraction kept per stage: {'; '.join(parts) or 'nothing measured'}"
        return {"retention": kept, "summary": summary}

    # -- cost accounting ----------------------------------------------------------------------------------------------

    def stage_lengths(self, T: float, retention: list[float] | None = None) -> list[float]:
        """Tokens at each stage's level for T tokens: exact top-k lengths, or T times the kept fractions."""
        lengths: list[float] = []
        for j, parent in enumerate(self.parent):
            outer = T if parent < 0 else lengths[parent]
            lengths.append(topk_length(int(outer), self.cfg.keep) if retention is None else outer * retention[j])
        return lengths

    def flow(self, kind: str, length: int | float, step: int | None = None) -> tuple[list, list, float]:
        """Training: the top-k lengths. Prefill: the kept fractions measured in prefills, else `keep`. Decode: a step
        reaches a stage with the probability the decode steps measured (else `keep`), and the stage's layers attend
        to the kept fraction of the caches (as measured in prefills, else in decode steps, else `keep`)."""
        keep = [self.cfg.keep] * len(self.parent)
        prefill, decode = self.retention("prefill"), self.retention("decode")
        if kind == "decode":
            tokens = [*self.stage_lengths(1.0, decode or keep), 1.0]  # probability of reaching each stage
            keys = [*self.stage_lengths(length, prefill or decode or keep), length]
        else:
            tokens = [*self.stage_lengths(length, None if kind == "train" else prefill or keep), length]
            keys = [(n + 1) / 2 for n in tokens]
        scorers = sum(2 * self.model.cfg.dim * tokens[p] for p in self.parent)  # on the enclosing level's tokens
        return [tokens[st] for st in self.stage_of_layer], [keys[st] for st in self.stage_of_layer], scorers

    # -- generation state ---------------------------------------------------------------------------------------------

    def caches(self, batch: int, max_len: int, dtype: torch.dtype, make: Callable[[int], KVCache]) -> list[KVCache]:
        """Outer layers get their own caches (`make`); a stage's layers start at about `keep` of what reaches the stage
        (+ 64 slots, so that short prompts and the first decoded tokens never reallocate) and grow if it keeps more."""
        self._lens = [[0] * batch for _ in self.parent]
        cfg, dev = self.model.cfg, self.model.norm.weight.device
        expected = self.stage_lengths(max_len, [self.cfg.keep] * len(self.parent))
        out: list[KVCache] = []
        for i, st in enumerate(self.stage_of_layer):
            if st < 0:
                out.append(make(i))
            else:
                slots = math.ceil(expected[st]) + 64
                out.append(StageCache(batch, max_len, slots, cfg.n_kv_heads, cfg.head_dim, dtype, dev))
        return out

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        """The stages' parameters in a plain list for the one-token path (mid-step, `self.stages[j].scorer.weight`,
        three Module lookups, costs ~50 us; docs/design.md) and the C++ ops if the model uses them."""
        self._stage_params = [(st.scorer.weight.detach(), st.bypass_scale.detach()) for st in self.stages]
        self._ops = self.model.fused[0] if self.model.fused is not None else None
        try:
            yield
        finally:
            self._stage_params = self._ops = None

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
        k = topk_length(T, self.cfg.keep)
        p = linear_schedule(self.cfg.balancer_prob, self.cfg.balancer_steps, self.step)
        if self.model.training and torch.is_grad_enabled() and random.random() < p:
            s = balance(s, balancer_bounds(self.cfg), self.cfg.balancer_grad_scale)
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

    def _threshold(self, j: int) -> float:  # one value for every stage, or one per stage
        return self.cfg.threshold[j] if isinstance(self.cfg.threshold, list) else self.cfg.threshold

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
        seen = int(valid.sum()) if valid is not None else s.numel()
        if self._scores is not None:  # calibrate_thresholds is listening
            self._scores[j].append(s[valid] if valid is not None else s.flatten())
        with torch.no_grad():
            k = counts.sum()
            stats = {"pos_frac": (s > 0).float().mean(), "kept_w": w.sum() / k.clamp(min=1)}
            self._stats[j] = {**stats, "kept": k / max(seen, 1)}
            self._kind_counts[j] += (float(k), float(seen))
        return idx, w, counts

    # -- routing ------------------------------------------------------------------------------------------------------

    def begin(self, s: Stream) -> Stream:
        """This forward's selection (top-k in training) and, with a padded batch in generation, its real tokens:
        `mask`'s last query row marks them (leanlm.generate.pad_batch), and pads are never selected."""
        m = self.model
        self._topk = m.training if self.selection is None else self.selection == "topk"
        if self._topk and m.caches is not None:
            raise LeanLMError("SUBLLM generation uses threshold selection (call model.eval())")
        B, T = s.x.shape[:2]
        self._kind_counts = self.counts["decode" if T == 1 else "prefill"]
        if not isinstance(s.pos, int):  # (B, T) absolute positions; a decode step's int waits for a gather
            s.pos = s.pos.expand(B, -1)
        if s.mask is not None:
            s.valid = s.mask[:, 0, -1, s.start : s.start + T]  # (B, T)
        return s

    def enter(self, i: int, s: Stream) -> Stream:
        for j in self.opens[i]:
            s = self._subsample(j, s)
        return s

    def leave(self, i: int, s: Stream) -> Stream:
        for j in self.closes[i]:
            s = self._upsample(j, s)
        return s

    def _subsample(self, j: int, outer: Stream) -> Stream:
        if outer.skip:  # an enclosing stage kept nothing: so does this one
            return Stream(None, 0, None, None, outer=outer, skip=True)
        x = outer.x  # (B, T, C)
        B, T, C = x.shape
        if not self._topk and B * T == 1 and outer.valid is None and self._scores is None:
            return self._subsample_one(j, outer)
        s = self.stages[j].scorer(x).squeeze(-1).float()  # (B, T) scores
        if self._topk:
            idx, w = self._select_topk(j, s)
            counts = None
        else:
            idx, w, counts = self._select_threshold(j, s, outer.valid)
        if idx.shape[1] == 0:  # no row kept a token (e.g. a dropped token in decoding): skip the whole segment
            return Stream(None, 0, None, None, outer=outer, skip=True)
        xg = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))  # (B, k, C)
        pos = outer.pos
        if isinstance(pos, int):
            pos = torch.arange(pos, pos + T, device=x.device).expand(B, -1)  # (B, T)
        pos = pos.gather(1, idx)  # (B, k) original absolute positions, composed across stages
        inner = Stream(xg, pos, *self.model.rope(pos, x.dtype), outer=outer, saved=(idx, w, xg))
        if counts is not None:  # threshold selection: rows are padded to the longest with filler a nested `(` skips
            inner.valid = torch.arange(idx.shape[1], device=x.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, k)
        if self.model.caches is not None:  # generation: this stage's layers append each row's kept tokens
            inner.start, inner.mask = self._stage_cache_view(j, counts, idx.shape[1], x.device)
        return inner

    def _subsample_one(self, j: int, outer: Stream) -> Stream:
        """Decoding one token of one row: `_select_threshold`'s rule without its index bookkeeping, which would cost
        more than a block here. The token enters the stage as is (same position, RoPE rows) or skips it. The only
        tensor work is the score (one C++ call in a cpp decode layout: mid-step an op costs ~0.1 ms, docs/design.md)."""
        w_s = self._stage_param(j)[0]  # (1, C)
        x = outer.x  # (1, 1, C)
        score = self._ops.score(x, w_s) if self._ops is not None else float(F.linear(x, w_s))
        kept = score > self._threshold(j)
        counts = self._kind_counts  # plain numpy: no tensor op
        counts[j, 1] += 1.0
        counts[j, 0] += kept
        if not kept:
            return Stream(None, 0, None, None, outer=outer, skip=True)
        w = min(max(score, 0.0), 1.0)  # a float `saved`: this stage took the one-token path
        inner = Stream(x, outer.pos, outer.cos, outer.sin, outer=outer, saved=w)
        if self.model.caches is not None:
            inner.start = self._lens[j][0]
            self._lens[j] = [inner.start + 1]
            for i in self.stage_layers[j]:
                if self.model.caches[i].slots is not None:  # (setting a module attribute is slow)
                    self.model.caches[i].slots = None
        return inner

    def _stage_cache_view(self, j: int, counts: Tensor | None, k: int, device: torch.device) -> tuple[int, Tensor]:
        """Cache slot and attention mask for k new tokens per row at stage j: row b writes its tokens at slots
        lens[b].. and query i attends to slots <= lens[b] + i (its row's earlier tokens, then itself)."""
        lens, caches = self._lens[j], self.model.caches
        self._lens[j] = [n + c for n, c in zip(lens, counts.tolist())]
        if len(set(lens)) == 1:  # every row has cached the same number of tokens: one shared slot range
            for i in self.stage_layers[j]:
                caches[i].slots = None
            return lens[0], None
        base = torch.tensor(lens, device=device).unsqueeze(1)  # (B, 1)
        slots = base + torch.arange(k, device=device).unsqueeze(0)  # (B, k)
        end = max(lens) + k
        for i in self.stage_layers[j]:
            caches[i].slots, caches[i].end = slots, end
        mask = torch.arange(end, device=device).view(1, 1, end) <= slots.unsqueeze(-1)  # (B, k, L)
        return 0, mask.unsqueeze(1)

    def _upsample(self, j: int, inner: Stream) -> Stream:
        outer = inner.outer
        if inner.skip:  # the stage kept nothing: its output is its input
            return outer
        if isinstance(inner.saved, float):  # the one-token path: x + w * b * (y - x), in two ops (or one)
            b = self._stage_param(j)[1]  # (C,)
            x, y, w = outer.x, inner.x, inner.saved
            outer.x = torch.addcmul(x, b, y - x, value=w) if self._ops is None else self._ops.upsample(x, y, b, w)
            return outer
        idx, w, xg = inner.saved
        scale = self.stages[j].bypass_scale  # (C,)
        if self.model.training and torch.is_grad_enabled() and random.random() < self.cfg.bypass_limit_prob:
            lo = linear_schedule(self.cfg.bypass_min, self.cfg.bypass_steps, self.step)
            scale = limit(scale, lo, 1.0)
        # kept: x + b * (u - x) with u = w y + (1 - w) x, i.e. x + b * w * (y - x); dropped tokens stay x
        delta = scale * w.unsqueeze(-1) * (inner.x - xg)  # (B, k, C)
        x = outer.x
        outer.x = x.scatter_add(1, idx.unsqueeze(-1).expand_as(delta), delta.to(x.dtype))
        return outer


@torch.no_grad()
def calibrate_thresholds(sub: SubLLM, batches: list[Tensor]) -> list[float]:
    """Per-stage inference thresholds v_j such that each stage keeps `keep` of the tokens reaching it on `batches`
    (token ids (B, T)), set on the method and the model's config, and returned.

    Stages are calibrated outermost first: which tokens reach an inner stage depends on the outer thresholds. With
    a calibrated balancer v = 0 already does this (the paper); short runs do not get there (docs/design.md).
    """
    model = sub.model
    n = len(sub.parent)
    v: list[float] = [0.0] * n
    was_training, selection = model.training, sub.selection
    model.eval()
    sub.selection = "threshold"
    try:
        for j in range(n):  # an enclosing stage has a lower index than the stages inside it
            sub.set_config(model, threshold=list(v))
            sub._scores = [[] for _ in range(n)]
            for x in batches:
                model(x)
            s = torch.cat(sub._scores[j]).float()  # the scores of every token that reached stage j
            drop = round((1 - sub.cfg.keep) * s.numel())
            v[j] = float(s.kthvalue(drop).values) if drop >= 1 else float(s.min()) - 1.0  # s > v for the rest
        sub.set_config(model, threshold=v)
    finally:
        sub._scores = None
        sub.selection = selection
        model.train(was_training)
    return v
