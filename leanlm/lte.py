"""LTE ("Learn To be Efficient", arXiv 2402.06126): learned, structured FFN sparsity (spec: shared/specs/lte.md).

Each SwiGLU FFN's neurons are grouped into experts of `expert_size` neurons (balanced k-means on the L2-normalised
gate rows; or, with `grouping: activations`, by their activations on training text), permuted so every expert is
contiguous, and given a linear router with an elementwise sigmoid.

- Stage 1 (training, soft): every expert is computed and its neurons are scaled by its score G; the model adds
  eta * L_eff + lambda_sep * L_sep through `aux_loss()`.
- Stage 2 (training, hard): routers frozen; expert i is on iff G_i > 0.5 and contributes unscaled.
- Inference (eval mode, any stage): hard routing. One token (decode) reads only the selected experts' weights;
  several tokens (prefill, batches) compute the union of their experts and mask per token.

    from leanlm.checkpoint import add_methods
    lte_model = add_methods(dense, dense.cfg.replace(lte=LTEConfig(eta=0.5)))  # grouping + permutation + routers

Layout (why it is interleaved): `gate_up_proj.weight` (2F, C) holds, per expert e, its E gate rows then its E up rows
([g_0; u_0; g_1; u_1; ...]), so one expert's gate/up weights are one block. Under `model.decode_layout` (generate on a
CPU) the gate/up weights move into an expert-major table (n, C, 2E): expert e's transposed block W_e^T, one
contiguous 2E x C run, whose rows are (input channel c, expert e) vectors of 2E values; down_proj.weight is
column-major, so down_proj.weight.t() is the contiguous transposed down projection (F, C). Decode then gathers
exactly the selected experts' values with two `embedding_bag` calls (a fused gather-and-weighted-sum kernel),
reading no unselected weight and each expert's weights as one contiguous stream (1.3x faster at 50% sparsity than
the column-major (C, 2F) rows, whose 2E-value pieces of one expert lie 2F values apart; docs/results.md).
With the C++ kernels (`decode_layout(model, kernel="cpp")`, `--kernel cpp`) one fused op (`lte_decode` in
kernels.cpp) does router, selection, gate/up, SiLU·up and down for the token, streaming each selected expert's two
blocks once (at 50% sparsity 1.8x faster than the dense FFN's fused op, the two embedding_bags 1.3x faster than the
PyTorch dense MLP; docs/results.md); "torch" (the default) needs no compiler.
`grouping` (F,) stores each position's original neuron.

Shapes: N tokens, C model width, F FFN width, n experts, E expert size (F = n * E).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.config import LTEConfig, ModelConfig
from leanlm.data import _windows
from leanlm.errors import LeanLMError
from leanlm.kernels import cpp_kernels
from leanlm.model import MLP, Transformer, dense_flops_per_token

TAU = 0.5  # score threshold: the paper uses 0.5 in every experiment


class LTEMLP(nn.Module):
    """SwiGLU FFN split into n experts of E neurons with a sigmoid router (see the module docstring for the layout)."""

    # one-token inference outside decode_layout (row-major weights, e.g. bf16) copies the selected experts' blocks
    # out; above this fraction of experts on, the whole FFN with a mask is cheaper. Inside decode_layout the expert
    # table is read in place at every fraction (not slower than dense even with all experts on; docs/results.md)
    DENSE_ABOVE = 0.6

    def __init__(self, dim: int, ffn_dim: int, lte: LTEConfig):
        super().__init__()
        lte.check(ffn_dim)  # equal-sized experts that tile the FFN: every layout below relies on it
        self.lte = lte
        self.n, self.E = ffn_dim // lte.expert_size, lte.expert_size
        self.gate_up_proj = nn.Linear(dim, 2 * ffn_dim, bias=False)  # rows [g_0; u_0; g_1; u_1; ...], E rows each
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)  # columns in expert order
        # the router reads exactly what the FFN reads (post_attention_layernorm output): "the input to the FFN"
        self.router = nn.Linear(dim, self.n, bias=False)
        # a separate 1-D offset: Transformer.init_weights zeroes `.bias` parameters but leaves this one as set here
        self.router_offset = nn.Parameter(torch.full((self.n,), float(lte.router_init_bias)))
        self.register_buffer("grouping", torch.arange(ffn_dim), persistent=True)  # original neuron of each position
        # hard sparsity of the last training forward (persistent: bench/flops of a saved model use it)
        self.register_buffer("train_sparsity", torch.zeros(()), persistent=True)
        self.set_stage(lte.stage)
        self.scores: Tensor | None = None  # stage-1 scores of the last training forward, for aux_loss
        self.magnitude_keep: float | None = None  # training-free baseline: keep this fraction of experts by |h|
        self._index: dict[torch.device, tuple[Tensor, ...]] = {}  # decode gather indices per device
        self._experts: Tensor | None = None  # (n, C, 2E) gate/up table while in decode_layout (module docstring)
        self._fused: tuple[Tensor, ...] | None = None  # the C++ kernel's weight views while in decode_layout
        self._ops = None  # the compiled kernels, while _fused is set
        self.reset_stats()

    def set_stage(self, stage: int) -> None:
        self.stage = stage
        for p in (self.router.weight, self.router_offset):
            p.requires_grad_(stage == 1)
            p.lr_scale = self.lte.router_lr_scale

    # -- statistics ---------------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.stat_tokens = 0  # tokens routed in eval mode since the last reset
        self.stat_active = 0  # ... and the experts they selected (sum over tokens)
        self.stat_computed = 0  # experts actually computed (the union for several tokens at once)
        self.stat_calls = 0

    def sparsity(self, train: bool = False) -> float:
        """Fraction of this FFN's neurons not used per token: measured at inference if any (and not `train`), else
        in the last training step."""
        if self.stat_tokens and not train:
            return 1.0 - self.stat_active / (self.stat_tokens * self.n)
        return float(self.train_sparsity)

    # -- forward ------------------------------------------------------------------------------------------------------

    def logits(self, x: Tensor) -> Tensor:
        return self.router(x) + self.router_offset  # (..., n); score = sigmoid(logit) > 0.5 iff logit > 0

    def hidden(self, x: Tensor) -> Tensor:
        gu = self._gate_up(x)  # (..., n, 2, E)
        return F.silu(gu[..., 0, :]) * gu[..., 1, :]  # (..., n, E)

    def _gate_up(self, x: Tensor, sel: Tensor | None = None) -> Tensor:
        """Gate/up pre-activations (..., k, 2, E) of the experts `sel` (k,), or of all n, in either layout."""
        if self._experts is not None:  # decode_layout: (n, C, 2E) table
            w = self._experts if sel is None else self._experts[sel]  # (k, C, 2E)
            gu = torch.matmul(x.reshape(-1, x.shape[-1]), w)  # (k, N, 2E) (einsum here: 3x slower)
            return gu.transpose(0, 1).reshape(*x.shape[:-1], -1, 2, self.E)
        w = self.gate_up_proj.weight
        if sel is not None:
            w = w.view(self.n, 2 * self.E, -1)[sel].flatten(0, 1)  # (k * 2E, C)
        return F.linear(x, w).unflatten(-1, (-1, 2, self.E))

    @contextlib.contextmanager
    def decode_layout(self, kernel: str) -> Iterator[None]:
        """Entered by `model.decode_layout` (after it made the Linear weights column-major): the gate/up weights
        live in the (n, C, 2E) expert table instead of `gate_up_proj.weight`, which holds no data meanwhile (any
        use of it fails loudly), so decode reads each expert as one block without keeping a second copy."""
        p = self.gate_up_proj.weight
        if p.dtype != torch.float32:  # decode_layout leaves other dtypes row-major (see there)
            yield
            return
        C = p.shape[1]
        fused = kernel == "cpp" and p.device.type == "cpu"
        if fused:
            self._ops = cpp_kernels()  # build (or load) first: a failure is one error, before any weight has moved
        with torch.inference_mode(False), torch.no_grad():
            self._experts = p.data.t().reshape(C, self.n, 2 * self.E).transpose(0, 1).contiguous()  # (n, C, 2E)
            p.data = p.data.new_empty(0)
            if fused:
                # (C, n) router, (n,) offset, (n, C, 2E) experts, (F, C) down: views of the column-major weights
                w_r, w_d = self.router.weight.detach().t(), self.down_proj.weight.detach().t()
                self._fused = (w_r.contiguous(), self.router_offset.detach(), self._experts, w_d.contiguous())
        try:
            yield
        finally:
            with torch.inference_mode(False), torch.no_grad():
                p.data = self._experts.transpose(1, 2).reshape(2 * self.n * self.E, C)  # (2F, C) row-major
            self._experts = self._fused = None

    def _kernel_ready(self) -> bool:
        """The C++ kernel routes hard: only in inference, inside its decode layout, without the magnitude baseline."""
        return self._fused is not None and not self.training and self.magnitude_keep is None

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel_ready() and x.shape[0] * x.shape[1] == 1:
            return self._decode_fused(x)
        logits = self.logits(x)  # (B, T, n)
        if self.training:
            on = logits.detach() > 0
            self.train_sparsity.copy_(1.0 - on.float().mean())  # a device copy: no host sync per layer and step
            if self.stage == 1:  # soft: every expert, scaled by its score
                self.scores = torch.sigmoid(logits)
                return self._scaled(x, self.scores)
            return self._scaled(x, on)  # hard, unscaled
        if self.magnitude_keep is not None:
            return self._magnitude(x)
        return self.infer(x, logits > 0)

    def infer(self, x: Tensor, on: Tensor) -> Tensor:
        """Hard routing with mask on (B, T, n): computes only selected experts (decode) or their union (several)."""
        B, T, C = x.shape
        if B * T == 0:  # e.g. an empty SUBLLM stage
            return x.new_zeros(x.shape)
        self.stat_tokens += B * T
        self.stat_calls += 1
        if B * T == 1:
            sel = on.view(-1).nonzero().view(-1)  # (k,) selected experts
            self.stat_active += sel.numel()
            self.stat_computed += sel.numel()
            if self._experts is None and sel.numel() > self.DENSE_ABOVE * self.n:
                return self._scaled(x, on)  # most experts on: the whole FFN with a mask beats copying them out
            return self._decode(x.view(C), sel).view(1, 1, C)
        self.stat_active += int(on.sum())
        sel = on.flatten(0, 1).any(0).nonzero().view(-1)  # (k,) union over the tokens
        self.stat_computed += sel.numel() * B * T
        if sel.numel() == self.n:
            return self._scaled(x, on)
        gu = self._gate_up(x, sel)  # (B, T, k, 2, E)
        h = F.silu(gu[..., 0, :]) * gu[..., 1, :] * on[..., sel].unsqueeze(-1)  # (B, T, k, E)
        w_d = self.down_proj.weight.view(C, self.n, self.E)[:, sel].flatten(1)  # (C, k * E)
        return F.linear(h.flatten(-2), w_d)  # (B, T, C)

    def _scaled(self, x: Tensor, c: Tensor) -> Tensor:
        """Every expert computed and its neurons scaled by c (..., n): the scores (soft) or a 0/1 mask (hard)."""
        return self.down_proj((self.hidden(x) * c.unsqueeze(-1)).flatten(-2))

    def _decode(self, x: Tensor, sel: Tensor) -> Tensor:
        """One token x (C,) through the selected experts sel (k,) only -> (C,)."""
        C, k, E = x.shape[0], sel.numel(), self.E
        if k == 0:
            return x.new_zeros(C)
        w_d = self.down_proj.weight
        if self._experts is None or not w_d.t().is_contiguous():  # row-major (outside decode_layout, or bf16)
            w_sel = self.gate_up_proj.weight.view(self.n, 2 * E, C)[sel]  # (k, 2E, C): a copy of the selected blocks
            gu = (w_sel @ x).view(k, 2, E)
            h = F.silu(gu[:, 0]) * gu[:, 1]  # (k, E)
            return w_d.view(C, self.n, E)[:, sel].flatten(1) @ h.flatten()
        rows, neurons, starts, every_e = self._index.get(x.device) or self._build_index(x.device)
        # gate/up: bag j sums, over input channels c, x[c] * (row (e_j, c) of the (n * C, 2E) table) = W_e x
        table = self._experts.view(self.n * C, 2 * E)
        gu = F.embedding_bag(
            rows[sel].view(-1), table, starts[:k], mode="sum", per_sample_weights=x.expand(k, C).reshape(-1)
        ).view(k, 2, E)
        h = F.silu(gu[:, 0]) * gu[:, 1]  # (k, E)
        # down: per expert, a bag summing h[j] * (row j of the transposed down projection (F, C)) over its neurons,
        # then the sum over experts: embedding_bag parallelises over bags, so one bag would use one core (1.4x slower)
        # (detached: a weight that requires grad takes embedding_bag's backward-ready kernel, 15% slower)
        table = w_d.detach().t()  # (F, C)
        y = F.embedding_bag(neurons[sel].view(-1), table, every_e[:k], mode="sum", per_sample_weights=h.view(-1))
        return y.sum(0)  # (k, C) -> (C,)

    def _decode_fused(self, x: Tensor, norm_w: Tensor | None = None, eps: float = 0.0) -> Tensor:
        """One token (1, 1, C) through the C++ kernel: routes (logit > 0, as `infer`) and reads only the selected
        experts' blocks of the expert table and of the transposed down projection, in one op. With `norm_w`, the
        whole FFN half of a block: x + FFN(rmsnorm(x))."""
        y, k = self._ops.lte_decode(x, *self._fused, norm_w, eps)  # like x; experts selected (fp32 only)
        stats = self.__dict__  # the counters are plain attributes: skip nn.Module.__setattr__ (µs each, 4 per layer)
        stats["stat_tokens"] += 1
        stats["stat_calls"] += 1
        stats["stat_active"] += k
        stats["stat_computed"] += k
        return y

    def decode_step(self, norm: nn.Module) -> Callable[[Tensor], Tensor]:
        """x -> x + FFN(norm(x)) for one token (1, 1, C): model.Block's fused decode path hands its FFN half over to
        this, made once per decode layout (mid-step, each Module attribute lookup such as `norm.weight` costs
        ~15 us, leanlm/kernels.cpp)."""
        norm_w, eps = norm.weight.detach(), norm.eps

        def step(x: Tensor) -> Tensor:
            if self._kernel_ready():
                return self._decode_fused(x, norm_w, eps)
            return x + self(norm(x))

        return step

    def _build_index(self, device: torch.device) -> tuple[Tensor, ...]:
        """Decode gather indices, built once per device (not buffers: models are built on the meta device)."""
        C = self.down_proj.weight.shape[0]
        channels = torch.arange(C, device=device)
        experts = torch.arange(self.n, device=device)
        rows = experts.unsqueeze(1) * C + channels.unsqueeze(0)  # (n, C): table row of (expert e, channel c)
        neurons = torch.arange(self.n * self.E, device=device).view(self.n, self.E)  # (n, E)
        starts = torch.arange(0, self.n * C, C, device=device)  # (n,) gate/up bag offsets: C rows per expert
        every_e = torch.arange(0, self.n * self.E, self.E, device=device)  # (n,) down bag offsets: E rows each
        # int32: half the bytes of the per-token index copy (rows[sel] is k * C entries)
        self._index[device] = tuple(t.to(torch.int32) for t in (rows, neurons, starts, every_e))
        return self._index[device]

    def _magnitude(self, x: Tensor) -> Tensor:
        """Training-free baseline (TEAL/Deja-Vu style oracle): per token keep the experts with the largest mean
        |activation| of their neurons, computed densely. Shows what routing by magnitude costs in quality."""
        h = self.hidden(x)  # (B, T, n, E)
        on = self.magnitude_choice(h, self.magnitude_keep)  # (B, T, n)
        self.stat_tokens += on.shape[0] * on.shape[1]
        self.stat_active += int(on.sum())
        return self.down_proj((h * on.unsqueeze(-1)).flatten(-2))

    def magnitude_choice(self, h: Tensor, keep: float) -> Tensor:
        """The baseline's choice: per token, the `keep` fraction of experts with the largest mean |h| (..., n, E)
        -> (..., n) bool (also the target that benchmarks/lte_predictor_probe.py fits routers to)."""
        top = h.abs().mean(-1).topk(max(1, round(keep * self.n)), dim=-1).indices  # (..., k)
        return torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device).scatter_(-1, top, True)


# -- the model ---------------------------------------------------------------------------------------------------------


def lte_layers(model: nn.Module) -> list[LTEMLP]:
    return [m for m in model.modules() if isinstance(m, LTEMLP)]


class LTEHooks:
    """Training-loop hooks (`aux_loss`, `train_metrics`, `set_step`) and cost accounting of an LTE model, mixed into
    whatever model class holds the blocks (the dense Transformer or SUBLLM) so methods compose; each hook calls the
    base class's own, if any."""

    def aux_loss(self) -> Tensor:
        base = super().aux_loss() if hasattr(super(), "aux_loss") else 0.0
        layers = [m for m in lte_layers(self) if m.scores is not None]
        if not layers:
            return base + self.embed_tokens.weight.new_zeros(())
        lte = self.cfg.lte
        g = [m.scores.float() for m in layers]
        # both losses are means over layers x experts x tokens: one global budget, so layers compete for it
        eff = torch.stack([(s.square() if lte.eff_squared else s).mean() for s in g]).mean()
        sep = torch.stack([(1.0 / ((s - TAU).square() + lte.sep_eps)).mean() for s in g]).mean()
        self._lte_losses = (eff.detach(), sep.detach())  # read (one host sync) only when train_metrics logs them
        for m in layers:
            m.scores = None
        return base + lte.eta * eff + lte.lambda_sep * sep

    def set_step(self, step: int) -> None:
        if hasattr(super(), "set_step"):
            super().set_step(step)
        if self.cfg.lte.stage == 2 and not bool(self.lte_stage1_done):
            raise LeanLMError(
                "model.lte.stage=2 needs the routers of a stage-1 LTE checkpoint: set run.init to a stage-1 "
                "checkpoint and add `model: {lte: {stage: 2}}` (stage 2 cannot start from untrained routers)"
            )
        if self.cfg.lte.stage == 1:
            self.lte_stage1_done.fill_(True)

    def train_metrics(self) -> dict:
        base = super().train_metrics() if hasattr(super(), "train_metrics") else {}
        layers = lte_layers(self)
        losses = getattr(self, "_lte_losses", None)  # device tensors of the last aux_loss
        eff, sep = [float(v) for v in losses] if losses else (None, None)
        per_layer = {f"lte_sparsity_{i:02d}": float(m.train_sparsity) for i, m in enumerate(layers)}
        return {
            **base,
            "lte_sparsity": sum(per_layer.values()) / max(len(layers), 1),
            "lte_ffn_cost": self.lte_ffn_cost(train=True),
            "lte_eff_loss": eff,
            "lte_sep_loss": sep,
            **per_layer,
        }

    def lte_ffn_cost(self, train: bool = False) -> float:
        """Executed FFN + router FLOPs under hard routing as a fraction of the dense FFN's, at the sparsity measured
        at inference (or, with `train` or before any inference, in the last training step)."""
        layers = lte_layers(self)
        C, Fd = self.cfg.dim, self.cfg.ffn_dim
        ffn, router = 6 * C * Fd, 2 * C * (Fd // self.cfg.lte.expert_size)
        return sum((1 - m.sparsity(train)) * ffn + router for m in layers) / (len(layers) * ffn)

    def flops_per_token(self, seq_len: int, training: bool = False, **base_kw) -> float:
        """The base model's count with each FFN's share scaled by its hard-routing cost, routers included.

        Training computes every expert (soft in stage 1, a masked dense FFN in stage 2), so only the routers are
        added there. At inference the FFN FLOPs saved are (1 - lte_ffn_cost) of the dense FFN's, scaled by the base
        model's executed fraction of dense work (SUBLLM runs fewer tokens through its inner blocks).
        """
        base = super().flops_per_token(seq_len, training=training, **base_kw)  # e.g. SUBLLM's `retention`
        dense = dense_flops_per_token(self.cfg, context=(seq_len + 1) / 2, training=training)
        return self._lte_flops(base, dense, training)

    def decode_flops(self, context: float, **base_kw) -> float:
        """One decode step (Transformer.decode_flops) with the FFN share scaled as in `flops_per_token`."""
        base = super().decode_flops(context, **base_kw)
        return self._lte_flops(base, dense_flops_per_token(self.cfg, context=context), training=False)

    def _lte_flops(self, base: float, dense: float, training: bool) -> float:
        C, Fd, L = self.cfg.dim, self.cfg.ffn_dim, self.cfg.n_layers
        ffn, router = 6 * C * Fd * L, 2 * C * (Fd // self.cfg.lte.expert_size) * L
        frac = base / dense  # tokens through the blocks relative to the dense model (1 unless SUBLLM)
        if training:
            return base + 3 * router * frac
        return base - ffn * frac * (1 - self.lte_ffn_cost())

    def lte_report(self) -> dict:
        """Inference sparsity measured since the last `lte_reset_stats()`: mean, per layer, and union overhead."""
        layers = lte_layers(self)
        per = [m.sparsity() for m in layers]
        tokens = sum(m.stat_tokens for m in layers)
        computed = sum(m.stat_computed for m in layers)
        return {
            "ffn_sparsity": sum(per) / len(per),
            "ffn_sparsity_per_layer": [round(s, 4) for s in per],
            "ffn_cost": self.lte_ffn_cost(),
            "union_sparsity": 1 - computed / (tokens * layers[0].n) if tokens and computed else None,
        }

    def lte_reset_stats(self) -> None:
        for m in lte_layers(self):
            m.reset_stats()


@functools.cache
def _with_hooks(cls: type) -> type:
    return type(f"LTE{cls.__name__}", (LTEHooks, cls), {"__doc__": f"{cls.__name__} with LTE FFNs."})


def apply_lte(model: Transformer, cfg: ModelConfig) -> Transformer:
    """Replace every block's MLP by an (uninitialised) LTE FFN and add the LTE hooks (called by build_model)."""
    for block in model.layers:
        if not isinstance(block.mlp, MLP):
            raise LeanLMError(f"LTE needs SwiGLU MLP blocks, found {type(block.mlp).__name__}")
        block.mlp = LTEMLP(cfg.dim, cfg.ffn_dim, cfg.lte)
    # stage 2 may only continue from trained routers: a flag saved with the weights, set by stage-1 training
    model.register_buffer("lte_stage1_done", torch.zeros((), dtype=torch.bool), persistent=True)
    model.__class__ = _with_hooks(type(model))
    return model


# -- preparation: expert grouping --------------------------------------------------------------------------------------


def balanced_kmeans(x: Tensor, n: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Cluster the rows of x (F, d) into n clusters of exactly F // n rows; returns the cluster of each row (F,).

    Balanced assignment is greedy on the whole (row, centroid) similarity matrix: pairs are taken best first and a
    row goes to a centroid while it has room (as in MoEfication's balanced assignment). Rows are L2-normalised first.
    """
    Fd = x.shape[0]
    size = Fd // n
    # on the CPU in float32 whatever the model's device: the greedy assignment is Python anyway, and the grouping
    # (stored in the checkpoint) then does not depend on where the model was loaded
    x = F.normalize(x.detach().float().cpu(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(Fd, generator=gen)[:n]].clone()  # (n, d)
    assign = torch.zeros(Fd, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()  # (F, n)
        order = sim.flatten().argsort(descending=True).tolist()
        new, room, left = [-1] * Fd, [size] * n, Fd  # plain Python: tensor indexing per pair is ~100x slower
        for flat in order:
            r, c = divmod(flat, n)
            if new[r] < 0 and room[c]:
                new[r] = c
                room[c] -= 1
                left -= 1
                if not left:
                    break
        new = torch.tensor(new)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, x), dim=1)
    return assign


def group_mlp(mlp: MLP, lte: LTEConfig, seed: int, assign: Tensor | None = None) -> dict[str, Tensor]:
    """The LTE state of a dense MLP: weights permuted so experts are contiguous (gate/up interleaved per expert).

    assign (F,): each neuron's expert (F // n neurons each) from another grouping rule; by default balanced k-means
    on the gate rows."""
    w_gu, w_d = mlp.gate_up_proj.weight.detach(), mlp.down_proj.weight.detach()
    Fd, C = w_d.shape[1], w_d.shape[0]
    n, E = Fd // lte.expert_size, lte.expert_size
    gate, up = w_gu[:Fd], w_gu[Fd:]
    if assign is None:
        assign = balanced_kmeans(gate, n, lte.kmeans_iters, seed)
    perm = assign.argsort(stable=True).to(w_d.device)  # (F,) original neurons, expert by expert
    blocks = torch.stack([gate[perm].view(n, E, C), up[perm].view(n, E, C)], dim=1)  # (n, 2, E, C)
    return {"gate_up_proj.weight": blocks.reshape(2 * Fd, C), "down_proj.weight": w_d[:, perm], "grouping": perm}


CALIBRATION_WINDOWS, CALIBRATION_LEN = 16, 512  # the training text grouping by activations looks at: 8,192 tokens
BAND = 8  # experts per magnitude band (8 beat 2, 4, 16 and a single band on SmolLM2: 24.5-25.1 vs 27.9 perplexity)


def calibration_rows(tokens: np.ndarray, max_seq_len: int, seed: int = 0) -> Tensor:
    """CALIBRATION_WINDOWS random windows (S, T) of a token array (a prepared split) for `activation_grouping`."""
    seq = min(CALIBRATION_LEN, max_seq_len, (len(tokens) - 1) // 2)
    if seq < 16:
        raise LeanLMError(f"model.lte.grouping=activations: {len(tokens)} training tokens are too few to group by")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(tokens) // seq - 1, generator=gen)[:CALIBRATION_WINDOWS] * seq
    return _windows(tokens, starts.tolist(), seq)[0]


@torch.no_grad()
def activation_grouping(model: nn.Module, rows: Tensor, expert_size: int) -> list[Tensor]:
    """Per layer of a dense model, each neuron's expert (F,), from what the neurons do on the token rows (S, T).

    Each token's |h| = |SiLU(gate) * up| is split into per-neuron shares. Neurons are sorted by their mean share and
    cut into bands of BAND experts, so an expert's neurons are of a similar size (most of the gain: the oracle keeps
    or drops whole experts, and a large neuron among small ones is dropped with them); inside a band, balanced
    k-means on the neurons' share profiles over the tokens puts neurons that are large on the same tokens together.
    """
    inputs: list[list[Tensor]] = [[] for _ in model.layers]
    handles = [
        b.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].flatten(0, 1)))
        for i, b in enumerate(model.layers)
    ]
    was_training = model.training
    try:
        model.eval()
        for s in range(0, rows.shape[0], 4):  # 4 rows at a time: the logits of 16 x 512 tokens would take 1.6 GB
            model(rows[s : s + 4])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    assigns = []
    for block, xs in zip(model.layers, inputs):
        shares = []
        for x in xs:  # (N, C) per chunk, one layer at a time: all layers' (N, F) shares at once would be ~3x larger
            gate, up = block.mlp.gate_up_proj(x).chunk(2, dim=-1)  # (N, F) each
            h = (F.silu(gate) * up).abs()
            shares.append(h / h.sum(1, keepdim=True))
        sh = torch.cat(shares)  # (S*T, F)
        order = sh.mean(0).argsort()  # neurons by mean share, smallest first
        assign, band = torch.empty(sh.shape[1], dtype=torch.long), BAND * expert_size
        for j in range(0, sh.shape[1], band):
            idx = order[j : j + band]  # (band,) one band's neurons, clustered by their profiles over the tokens
            assign[idx] = j // expert_size + balanced_kmeans(sh[:, idx].t(), idx.numel() // expert_size)
        assigns.append(assign)
    return assigns


def lte_state_dict(
    model: Transformer, cfg: ModelConfig, seed: int = 0, calibration: Tensor | None = None
) -> dict[str, Tensor]:
    """The state dict to load into build_model(cfg) when `model` gets (or changes) its LTE stage.

    dense -> stage 1: groups and permutes every FFN (grouping=activations: from the calibration token rows (S, T)).
    stage 1 -> stage 2: the same weights, routers kept.
    """
    old, new = model.cfg.lte, cfg.lte
    state = dict(model.state_dict())
    if old is None:
        if new.stage != 1:
            raise LeanLMError(
                "model.lte.stage=2 needs a stage-1 LTE checkpoint as run.init (got a model without LTE); "
                "run stage 1 first"
            )
        assigns: list[Tensor | None] = [None] * len(model.layers)
        if new.grouping == "activations":
            if calibration is None:
                raise LeanLMError(
                    "model.lte.grouping=activations needs training text to group by: convert with `leanlm train`"
                )
            assigns = activation_grouping(model, calibration, new.expert_size)
        for i, block in enumerate(model.layers):
            for k, v in group_mlp(block.mlp, new, seed + i, assigns[i]).items():
                state[f"layers.{i}.mlp.{k}"] = v
        return state
    if old.expert_size != new.expert_size:
        raise LeanLMError(
            f"model.lte.expert_size: the model's experts have {old.expert_size} neurons, not {new.expert_size}"
        )
    if old.grouping != new.grouping:
        raise LeanLMError(f"model.lte.grouping: the model's experts were grouped by {old.grouping}, not {new.grouping}")
    if (old.stage, new.stage) not in ((1, 1), (1, 2), (2, 2)):
        raise LeanLMError(f"model.lte.stage: cannot go from stage {old.stage} back to stage {new.stage}")
    return state


@torch.no_grad()
def init_routers(model: nn.Module, seed: int) -> None:
    """Initialise new routers as the config says (after the grouped weights are in place).

    random: weights ~ N(0, router_init_std). centroid (MoEfication-style): router row e = the normalised mean of
    expert e's normalised gate rows, scaled to norm router_init_std, so an expert starts "on" for inputs that align
    with its gate directions. Offsets = router_init_bias.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    for m in lte_layers(model):
        if m.lte.router_init == "centroid":
            C = m.gate_up_proj.weight.shape[1]
            gate = F.normalize(m.gate_up_proj.weight.view(m.n, 2, m.E, C)[:, 0].float(), dim=-1)  # (n, E, C)
            w = F.normalize(gate.mean(1), dim=-1) * m.lte.router_init_std  # (n, C)
        else:
            w = torch.randn(m.router.weight.shape, generator=gen) * m.lte.router_init_std
        m.router.weight.copy_(w)
        m.router_offset.fill_(m.lte.router_init_bias)


def set_magnitude_routing(model: nn.Module, keep: float | None) -> None:
    """Switch every LTE FFN to the training-free baseline (keep the top `keep` fraction of experts by |h|), or back."""
    for m in lte_layers(model):
        m.magnitude_keep = keep
