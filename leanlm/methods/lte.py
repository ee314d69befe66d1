"""LTE ("Learn To be Efficient", arXiv 2402.06126): learned, structured FFN sparsity (docs/methods.md).

Each SwiGLU FFN's neurons are grouped into experts of `expert_size` neurons, permuted so every expert is contiguous,
and given a linear router with an elementwise sigmoid; LTE is the model's FFN (LTEMLP). Stage 1 (training, soft):
every expert is computed and scaled by its score G, and `aux_loss` adds eta * L_eff + lambda_sep * L_sep. Stage 2
(training, hard): routers frozen; expert i is on iff G_i > 0.5, unscaled. Inference (eval mode) routes hard: one token
(decode) reads only its experts' weights; several tokens (prefill, batches) compute the union of their experts, and
are costed so. Converting a dense model groups the neurons (k-means on the gate rows, or by their activations on
calibration text) and initialises the routers (`router_init: fitted` fits them to the training-free oracle).

Layout: `gate_up_proj.weight` (2F, C) holds, per expert e, its E gate rows then its E up rows, so one expert's
weights are one block; `down_proj` (C, F) has its columns in expert order; `grouping` (F,) stores each position's
original neuron. In `decode_layout` the gate/up weights move into an expert-major table (n, C, 2E) (docs/design.md).

Shapes: N tokens, C model width, F FFN width, n experts, E expert size (F = n * E).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.cluster import balanced_kmeans
from leanlm.errors import LeanLMError
from leanlm.kernels import cpp_kernels, decode_weight
from leanlm.methods.base import Method, NeedsCalibration
from leanlm.model import MLP, ModelConfig, RMSNorm, Transformer, WeightOf
from leanlm.quant import PACK, Packed

TAU = 0.5  # score threshold: the paper uses 0.5 in every experiment
ROUTER_INITS = ("random", "centroid", "fitted")
BAND = 8  # experts per magnitude band of the activation grouping (8 beat 2, 4, 16 and one band on SmolLM2)
GROUPING_TOKENS = 8192  # calibration tokens the activation grouping looks at
FIT_STEPS, FIT_LR, FIT_BATCH = 400, 3e-3, 1024  # Adam steps of FIT_BATCH tokens per fitted router


@dataclass
class LTEConfig:
    """The `model.lte` section. Stage 1 trains everything with soft routing and L_task + eta * L_eff + lambda_sep *
    L_sep; stage 2 freezes the routers and fine-tunes with hard routing (expert on iff score > 0.5). Inference
    always routes hard. The choices the paper leaves open are explained in docs/design.md."""

    expert_size: int = 32  # neurons per expert; must divide model.ffn_dim
    stage: int = 1  # 1: soft routing + efficiency/separability losses; 2: frozen routers, hard routing, task loss
    eta: float = 0.0  # weight of the efficiency loss: the one sparsity knob (the paper sweeps 0..2)
    lambda_sep: float = 0.5  # weight of the separability loss (0.5 in every paper run)
    # L_sep = mean 1 / ((G - 0.5)^2 + sep_eps): bounded where the paper's 1/(G-0.5)^2 is not; 0.1 (not 0.01) so that
    # eta can move scores across 0.5 at all (docs/design.md)
    sep_eps: float = 0.1
    eff_squared: bool = True  # L_eff = mean G^2 (the paper's formula); False: mean G (the paper's text)
    # random: weights ~ N(0, router_init_std); centroid: each expert's mean gate row; fitted: fitted to the
    # training-free oracle's choice (keep `keep` of the experts by |SiLU(gate) * up|) on calibration text
    router_init: str = "random"
    router_init_bias: float = 1.5  # initial logit offset: scores start at ~0.82, near the dense function
    router_init_std: float = 0.02  # random: the weights' std; centroid: the norm of each router row
    router_lr_scale: float = 1.0  # the routers learn at this multiple of the base learning rate
    kmeans_iters: int = 20  # balanced k-means iterations when grouping a dense model
    # how a dense model's neurons become experts: "weights" = balanced k-means on the gate rows (the paper's);
    # "activations" = by their |SiLU(gate) * up| on calibration text (magnitude bands, then k-means on per-token
    # shares; docs/design.md). A later stage must say the same.
    grouping: str = "weights"
    keep: float = 0.5  # router_init fitted: the fraction of experts each token keeps on the calibration text
    refit_down: bool = False  # router_init fitted: refit the down projections by least squares under the routers

    def check(self, model_cfg: ModelConfig) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.lte.{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.expert_size, int) or self.expert_size < 1:
            raise bad("expert_size", "must be a positive integer")
        if model_cfg.ffn_dim % self.expert_size:
            raise bad("expert_size", f"must divide model.ffn_dim={model_cfg.ffn_dim} (experts are equal-sized)")
        if self.stage not in (1, 2):
            raise bad("stage", "must be 1 (soft routing, router training) or 2 (frozen routers, hard routing)")
        for name in ("eta", "lambda_sep", "router_init_std", "sep_eps", "router_lr_scale"):
            positive = name in ("sep_eps", "router_lr_scale")
            if not (getattr(self, name) > 0 if positive else getattr(self, name) >= 0):
                raise bad(name, "must be positive" if positive else "must be >= 0")
        if self.router_init not in ROUTER_INITS:
            raise bad("router_init", f"must be one of {', '.join(ROUTER_INITS)}")
        if self.kmeans_iters < 1:
            raise bad("kmeans_iters", "must be >= 1")
        if self.grouping not in ("weights", "activations"):
            raise bad("grouping", "must be weights (k-means on the gate rows) or activations (on calibration text)")
        if not 0 < self.keep < 1:
            raise bad("keep", "must lie strictly between 0 and 1")
        if self.refit_down and self.router_init != "fitted":
            raise bad("refit_down", "refits under fitted routers: needs router_init: fitted")


class LTEMLP(MLP):
    """SwiGLU FFN split into n experts of E neurons with a sigmoid router (see the module docstring for the layout)."""

    DENSE_ABOVE = 0.6  # one row-major token: above this fraction of experts on, a masked dense FFN beats copying them

    def __init__(self, dim: int, ffn_dim: int, lte: LTEConfig):
        if ffn_dim % lte.expert_size:  # equal-sized experts that tile the FFN: every layout below relies on it
            raise LeanLMError(f"model.lte.expert_size: must divide model.ffn_dim={ffn_dim} (got {lte.expert_size})")
        super().__init__(dim, ffn_dim)  # gate_up_proj rows [g_0; u_0; g_1; u_1; ...]; down_proj columns by expert
        self.lte = lte
        self.n, self.E = ffn_dim // lte.expert_size, lte.expert_size
        self.router = nn.Linear(dim, self.n, bias=False)  # reads what the FFN reads: "the input to the FFN layer"
        # a separate 1-D offset: Transformer.init_weights zeroes `.bias` parameters but leaves this one as set here
        self.router_offset = nn.Parameter(torch.full((self.n,), float(lte.router_init_bias)))
        self.register_buffer("grouping", torch.arange(ffn_dim), persistent=True)  # original neuron of each position
        # hard sparsity of the last training forward (persistent: the cost of a saved model before any measurement)
        self.register_buffer("train_sparsity", torch.zeros(()), persistent=True)
        self.stage = lte.stage
        self.router.requires_grad_(self.stage == 1)
        self.router_offset.requires_grad_(self.stage == 1)
        self.scores: Tensor | None = None  # stage-1 scores of the last training forward, for aux_loss
        self.magnitude_keep: float | None = None  # training-free baseline: keep this fraction of experts by |h|
        self._index: dict[torch.device, tuple[Tensor, ...]] = {}  # decode gather indices per device
        self._experts: Tensor | None = None  # (n, C, 2E) gate/up table while in decode_layout
        self._fused: tuple[Any, tuple] | None = None  # the C++ ops and lte_decode's weights, in decode_layout
        self.reset_stats()

    # -- statistics ---------------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        # per pass kind (one token per row = a decode step): [tokens routed in eval mode, experts they chose (summed
        # over tokens), experts computed (the union of a call's tokens, once per token)]
        self.stats = {"prefill": [0, 0, 0], "decode": [0, 0, 0]}

    def _count(self, T: int, tokens: int, active: int, computed: int) -> None:
        s = self.stats["decode" if T == 1 else "prefill"]
        s[0] += tokens
        s[1] += active
        s[2] += computed

    def sparsity(self) -> float:
        """Fraction of the experts a token does not use at inference since reset_stats, else in the last training."""
        tokens = sum(s[0] for s in self.stats.values())
        if tokens:
            return 1.0 - sum(s[1] for s in self.stats.values()) / (tokens * self.n)
        return float(self.train_sparsity)

    def cost(self, kind: str) -> float:
        """Fraction of the FFN a pass of `kind` computes per token: every expert in training; at inference what was
        computed since reset_stats (the union for several tokens at once), else for a decode step the last training
        step's choice and for a prefill every expert (the union of many tokens' experts is nearly all of them)."""
        s = self.stats.get(kind)
        if s is not None and s[0]:
            return s[2] / (s[0] * self.n)
        return 1.0 - float(self.train_sparsity) if kind == "decode" else 1.0

    def flops_per_token(self, kind: str) -> float:
        return super().flops_per_token(kind) * self.cost(kind) + 2.0 * self.router.weight.numel()

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
        """The gate/up weights live in the (n, C, 2E) expert table instead of `gate_up_proj.weight`, which holds no
        data meanwhile (any use of it fails loudly), so decode reads each expert as one block without a second
        copy. With kernel "cpp" the C++ kernel gets views of the column-major router and down projection. Packed
        (quantized) weights stay as they are: the kernel reads the selected experts' packed rows (`_decode_packed`)."""
        self._fused = self._decode_packed(kernel)
        if self._fused is not None:
            try:
                yield
            finally:
                self._fused = None
            return
        p = self.gate_up_proj.weight
        if p.dtype != torch.float32:  # decode_layout leaves other dtypes row-major
            yield
            return
        C = p.shape[1]
        ops = cpp_kernels() if kernel == "cpp" and p.device.type == "cpu" else None  # a build failure: before any move
        with torch.inference_mode(False), torch.no_grad():
            self._experts = p.data.t().reshape(C, self.n, 2 * self.E).transpose(0, 1).contiguous()  # (n, C, 2E)
            p.data = p.data.new_empty(0)
            if ops is not None:  # (C, n) router, (n,) offset, (n, C, 2E) experts, (C, F) down column-major
                w_r, w_d = self.router.weight.detach().t(), self.down_proj.weight.detach().t()
                experts, down = ops.dense(self._experts), ops.dense(w_d.contiguous().t())
                self._fused = (ops, (w_r.contiguous(), self.router_offset.detach(), experts, down))
        try:
            yield
        finally:
            with torch.inference_mode(False), torch.no_grad():
                p.data = self._experts.transpose(1, 2).reshape(2 * self.n * self.E, C)  # (2F, C) row-major
            self._experts = self._fused = None

    def _decode_packed(self, kernel: str) -> tuple[Any, tuple] | None:
        """kernel "cpp" on packed gate/up and down (leanlm.quant): lte_decode's arguments, the (C, n) router, the
        offset and the weights as stored (expert e: rows [2Ee, 2E(e+1)) of gate/up, inputs [Ee, E(e+1)) of down), so
        only the selected experts' packed bytes are read. None: the float path."""
        gu, down, w_r = self.gate_up_proj, self.down_proj, self.router.weight
        packed = isinstance(gu, Packed) and isinstance(down, Packed) and w_r.dtype == torch.float32
        if kernel != "cpp" or not packed or (down.fmt in ("int4", "ternary") and self.E % PACK):  # whole packed runs
            return None
        w_gu, w_d = decode_weight(gu), decode_weight(down)  # None off the CPU
        if w_gu is None or w_d is None:
            return None
        return cpp_kernels(), (w_r.detach().t().contiguous(), self.router_offset.detach(), w_gu, w_d)

    def decode_step(self, norm: RMSNorm, ops: Any, weight: WeightOf) -> Callable[[Tensor], Tensor]:
        """x -> x + FFN(norm(x)) for one token (1, 1, C), made once per decode layout (mid-step lookups cost µs)."""
        norm_w, eps = norm.weight.detach(), norm.eps

        def step(x: Tensor) -> Tensor:
            if self._kernel_ready():
                return self._decode_fused(x, norm_w, eps)
            return x + self(norm(x))

        return step

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
        if B * T == 1:
            sel = on.view(-1).nonzero().view(-1)  # (k,) selected experts
            dense = self._experts is None and sel.numel() > self.DENSE_ABOVE * self.n
            self._count(T, 1, sel.numel(), self.n if dense else sel.numel())
            if dense:
                return self._scaled(x, on)  # most experts on: the whole FFN with a mask beats copying them out
            return self._decode(x.view(C), sel).view(1, 1, C)
        sel = on.flatten(0, 1).any(0).nonzero().view(-1)  # (k,) the union over the tokens: what is computed
        self._count(T, B * T, int(on.sum()), sel.numel() * B * T)
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
        # down: one bag per expert over its rows of the transposed down projection (F, C), then the sum over experts
        # (embedding_bag parallelises over bags; detached: a weight that requires grad takes a slower kernel)
        table = w_d.detach().t()  # (F, C)
        y = F.embedding_bag(neurons[sel].view(-1), table, every_e[:k], mode="sum", per_sample_weights=h.view(-1))
        return y.sum(0)  # (k, C) -> (C,)

    def _decode_fused(self, x: Tensor, norm_w: Tensor | None = None, eps: float = 0.0) -> Tensor:
        """One token (1, 1, C) through the C++ kernel: routes (logit > 0, as `infer`) and reads only the selected
        experts' blocks, in one op. With `norm_w`, the whole FFN half of a block: x + FFN(rmsnorm(x))."""
        ops, weights = self._fused
        y, k = ops.lte_decode(x, *weights, norm_w, eps)  # like x; experts selected (fp32 only)
        self._count(1, 1, k, k)  # plain list updates: no Module attribute writes on this path
        return y

    def _build_index(self, device: torch.device) -> tuple[Tensor, ...]:
        """Decode gather indices, built once per device (not buffers: models are built on the meta device)."""
        C = self.down_proj.weight.shape[0]
        channels = torch.arange(C, device=device)
        experts = torch.arange(self.n, device=device)
        rows = experts.unsqueeze(1) * C + channels.unsqueeze(0)  # (n, C): table row of (expert e, channel c)
        neurons = torch.arange(self.n * self.E, device=device).view(self.n, self.E)  # (n, E)
        starts = torch.arange(0, self.n * C, C, device=device)  # (n,) gate/up bag offsets: C rows per expert
        every_e = torch.arange(0, self.n * self.E, self.E, device=device)  # (n,) down bag offsets: E rows each
        self._index[device] = tuple(t.to(torch.int32) for t in (rows, neurons, starts, every_e))  # half int64's bytes
        return self._index[device]

    def _magnitude(self, x: Tensor) -> Tensor:
        """Training-free baseline (TEAL/Deja-Vu style oracle): per token keep the experts with the largest mean
        |activation| of their neurons, computed densely. Shows what routing by magnitude costs in quality."""
        h = self.hidden(x)  # (B, T, n, E)
        on = self.magnitude_choice(h, self.magnitude_keep)  # (B, T, n)
        N = on.shape[0] * on.shape[1]
        self._count(on.shape[1], N, int(on.sum()), N * self.n)
        return self.down_proj((h * on.unsqueeze(-1)).flatten(-2))

    def magnitude_choice(self, h: Tensor, keep: float) -> Tensor:
        """The baseline's choice: per token, the `keep` fraction of experts with the largest mean |h| (..., n, E)
        -> (..., n) bool (also what `router_init: fitted` fits the routers to)."""
        top = h.abs().mean(-1).topk(max(1, round(keep * self.n)), dim=-1).indices  # (..., k)
        return torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device).scatter_(-1, top, True)


def lte_layers(model: Transformer) -> list[LTEMLP]:
    return [b.mlp for b in model.layers if isinstance(b.mlp, LTEMLP)]


def set_magnitude_routing(model: Transformer, keep: float | None) -> None:
    """Switch every LTE FFN to the training-free baseline (keep the top `keep` fraction of experts by |h|), or back."""
    for m in lte_layers(model):
        m.magnitude_keep = keep


class LTE(Method):
    """LTE's FFNs, its two training stages, and converting a dense model (see the module docstring)."""

    name = "lte"
    Config = LTEConfig
    retired_keys = ("decode_kernel",)  # the kernel became a run-time choice (--kernel)

    def ffn_factory(self, model_cfg: ModelConfig) -> Callable[[int], MLP]:
        return lambda layer: LTEMLP(model_cfg.dim, model_cfg.ffn_dim, self.cfg)

    def attach(self, model: Transformer) -> None:
        # stage 2 may only continue from trained routers: a flag saved with the weights, set by stage-1 training
        model.register_buffer("lte_stage1_done", torch.zeros((), dtype=torch.bool), persistent=True)

    def init_weights(self, model: Transformer, seed: int | None) -> None:
        """A model built from scratch: nothing trained to group or to fit routers to, so only random routers."""
        if self.cfg.grouping == "activations" or self.cfg.router_init == "fitted":
            what = "grouping=activations" if self.cfg.grouping == "activations" else "router_init=fitted"
            raise LeanLMError(f"model.lte.{what} converts a trained dense model: set run.init to one")
        init_routers(model, seed)

    def convert(self, model: Transformer, source: Transformer, seed: int, calibration: Tensor | None) -> None:
        """dense -> stage 1: group and permute every FFN, then initialise the routers. stage 1 -> stage 2: the same
        weights and routers."""
        old, new = source.cfg.methods.get(self.name), self.cfg
        if old is not None:
            for key in ("expert_size", "grouping"):
                if getattr(old, key) != getattr(new, key):
                    was, now = getattr(old, key), getattr(new, key)
                    raise LeanLMError(f"model.lte.{key}: the model's experts have {key} {was!r}, not {now!r}")
            if (old.stage, new.stage) not in ((1, 1), (1, 2), (2, 2)):
                raise LeanLMError(f"model.lte.stage: cannot go from stage {old.stage} back to stage {new.stage}")
            return
        if new.stage != 1:
            raise LeanLMError("model.lte.stage=2 needs a stage-1 LTE model to start from (got one without LTE)")
        needs_text = new.grouping == "activations" or new.router_init == "fitted"
        if needs_text and calibration is None:
            raise NeedsCalibration(
                f"model.lte: grouping={new.grouping}, router_init={new.router_init} needs calibration text: convert "
                "with `leanlm convert --calibrate DATA` or `leanlm train` (which uses its training text)"
            )
        inputs = ffn_inputs(source, calibration) if needs_text else None  # (L, N, C) what every FFN reads
        assigns: list[Tensor | None] = [None] * len(source.layers)
        if new.grouping == "activations":
            assigns = activation_grouping(source, inputs[:, :GROUPING_TOKENS], new.expert_size)
        with torch.no_grad():
            for i, (block, src) in enumerate(zip(model.layers, source.layers)):
                block.mlp.load_state_dict(group_mlp(src.mlp, new, seed + i, assigns[i]), strict=False)
        init_routers(model, seed)
        if new.router_init == "fitted":
            fit_routers(model, inputs, new.keep, new.refit_down, seed)
            model.lte_stage1_done.fill_(True)  # fitted routers count as trained: stage 2 may start from them

    def lr_scales(self, model: Transformer) -> dict[str, float]:
        params = (f"layers.{i}.mlp.{p}" for i in range(len(model.layers)) for p in ("router.weight", "router_offset"))
        return dict.fromkeys(params, self.cfg.router_lr_scale)

    def set_step(self, model: Transformer, step: int) -> None:
        if self.cfg.stage == 2 and not self.__dict__.get("_checked"):  # once: reading the flag waits for the device
            if not bool(model.lte_stage1_done):
                raise LeanLMError(
                    "model.lte.stage=2 needs the routers of a stage-1 LTE checkpoint: set run.init to a stage-1 "
                    "checkpoint and add `model: {lte: {stage: 2}}` (stage 2 cannot start from untrained routers)"
                )
            self._checked = True
        if self.cfg.stage == 1:
            model.lte_stage1_done.fill_(True)

    def aux_loss(self, model: Transformer) -> Tensor | None:
        layers = [m for m in lte_layers(model) if m.scores is not None]
        if not layers:
            return None
        c = self.cfg
        g = [m.scores.float() for m in layers]
        # both losses are means over layers x experts x tokens: one global budget, so layers compete for it
        eff = torch.stack([(s.square() if c.eff_squared else s).mean() for s in g]).mean()
        sep = torch.stack([(1.0 / ((s - TAU).square() + c.sep_eps)).mean() for s in g]).mean()
        self._losses = (eff.detach(), sep.detach())  # read (one host sync) only when train_metrics logs them
        for m in layers:
            m.scores = None
        return c.eta * eff + c.lambda_sep * sep

    def train_metrics(self, model: Transformer) -> dict[str, float]:
        """Hard-routing sparsity of the last training step (mean, per layer), what hard routing would compute of the
        dense FFN with the routers, and stage 1's two losses."""
        layers = lte_layers(model)
        losses = getattr(self, "_losses", None)  # device tensors of the last aux_loss
        eff, sep = [float(v) for v in losses] if losses else (None, None)
        per_layer = {f"lte_sparsity_{i:02d}": float(m.train_sparsity) for i, m in enumerate(layers)}
        ffn = MLP.flops_per_token(layers[0], "train")  # each layer's dense FFN
        hard = sum(ffn * (1 - s) + 2.0 * m.router.weight.numel() for m, s in zip(layers, per_layer.values()))
        mean = sum(per_layer.values()) / len(layers)
        cost = hard / (ffn * len(layers))
        return {"lte_sparsity": mean, "lte_ffn_cost": cost, "lte_eff_loss": eff, "lte_sep_loss": sep, **per_layer}

    def reset_stats(self, model: Transformer) -> None:
        for m in lte_layers(model):
            m.reset_stats()

    def report(self, model: Transformer) -> dict[str, Any]:
        """Per-token sparsity at inference (mean, per layer); the FFN work executed per token as a fraction of the
        dense FFN's, routers included, in prefills (the union of their tokens' experts) and decode steps."""
        layers = lte_layers(model)
        per = [m.sparsity() for m in layers]
        cost: dict[str, float | None] = {}
        for kind in ("prefill", "decode"):
            measured = any(m.stats[kind][0] for m in layers)
            dense = sum(MLP.flops_per_token(m, kind) for m in layers)
            cost[kind] = sum(m.flops_per_token(kind) for m in layers) / dense if measured else None
        done = [f"{k} {v:.3f}" for k, v in cost.items() if v is not None]
        summary = f"LTE: FFN sparsity {sum(per) / len(per):.3f} per token; executed FFN cost (routers included) "
        summary += ", ".join(done) + " of dense" if done else "not measured"
        sparsity = {"ffn_sparsity": sum(per) / len(per), "ffn_sparsity_per_layer": [round(s, 4) for s in per]}
        return {**sparsity, "ffn_cost": cost, "summary": summary}


# -- conversion: expert grouping and router initialisation -------------------------------------------------------------


def group_mlp(mlp: MLP, lte: LTEConfig, seed: int, assign: Tensor | None = None) -> dict[str, Tensor]:
    """The LTE state of a dense MLP: weights permuted so experts are contiguous (gate/up interleaved per expert).
    assign (F,): each neuron's expert from another grouping rule; by default balanced k-means on the gate rows."""
    w_gu, w_d = mlp.gate_up_proj.weight.detach(), mlp.down_proj.weight.detach()
    Fd, C = w_d.shape[1], w_d.shape[0]
    n, E = Fd // lte.expert_size, lte.expert_size
    gate, up = w_gu[:Fd], w_gu[Fd:]
    if assign is None:
        assign = balanced_kmeans(gate, n, lte.kmeans_iters, seed)
    perm = assign.argsort(stable=True).to(w_d.device)  # (F,) original neurons, expert by expert
    blocks = torch.stack([gate[perm].view(n, E, C), up[perm].view(n, E, C)], dim=1)  # (n, 2, E, C)
    return {"gate_up_proj.weight": blocks.reshape(2 * Fd, C), "down_proj.weight": w_d[:, perm], "grouping": perm}


def ffn_inputs(model: Transformer, rows: Tensor) -> Tensor:
    """What each block's FFN reads on the token rows (S, T): (L, S * T, C) in bfloat16 (the inputs of 32k tokens of
    SmolLM2's 30 layers then take 1.1 GB). An LTE model with every expert on reads what its dense source reads."""
    inputs: list[list[Tensor]] = [[] for _ in model.layers]
    handles = [
        b.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].flatten(0, 1).bfloat16()))
        for i, b in enumerate(model.layers)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for s in range(0, rows.shape[0], 4):  # 4 rows at a time, the lm head only at the last position
                model(rows[s : s + 4], last_only=True)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return torch.stack([torch.cat(xs) for xs in inputs])


@torch.no_grad()
def activation_grouping(model: Transformer, inputs: Tensor, expert_size: int) -> list[Tensor]:
    """Per layer of a dense model, each neuron's expert (F,), from what the neurons do on the FFN inputs (L, N, C).
    Each token's |h| = |SiLU(gate) * up| is split into per-neuron shares. Neurons are sorted by their mean share and
    cut into bands of BAND experts, so an expert's neurons are of a similar size (the oracle keeps or drops whole
    experts); inside a band, balanced k-means on the share profiles puts neurons large on the same tokens together."""
    assigns = []
    for block, x in zip(model.layers, inputs):
        shares = []
        for chunk in x.split(4096):  # (N, C) a chunk at a time: all tokens' (N, F) activations at once are large
            gate, up = block.mlp.gate_up_proj(chunk.float()).chunk(2, dim=-1)  # (N, F) each
            h = (F.silu(gate) * up).abs()
            shares.append(h / h.sum(1, keepdim=True))
        sh = torch.cat(shares)  # (N, F)
        order = sh.mean(0).argsort()  # neurons by mean share, smallest first
        assign, band = torch.empty(sh.shape[1], dtype=torch.long), BAND * expert_size
        for j in range(0, sh.shape[1], band):
            idx = order[j : j + band]  # (band,) one band's neurons, clustered by their profiles over the tokens
            assign[idx] = j // expert_size + balanced_kmeans(sh[:, idx].t(), idx.numel() // expert_size)
        assigns.append(assign)
    return assigns


@torch.no_grad()
def init_routers(model: Transformer, seed: int | None) -> None:
    """Initialise new routers as the config says, after the grouped weights are in place. random: N(0,
    router_init_std); centroid (MoEfication-style): row e = the normalised mean of expert e's normalised gate rows,
    scaled to norm router_init_std. Offsets = router_init_bias. (fitted: `fit_routers` follows.)"""
    gen = torch.Generator().manual_seed(seed + 7919) if seed is not None else None
    for m in lte_layers(model):
        if m.lte.router_init == "centroid":
            C = m.gate_up_proj.weight.shape[1]
            gate = F.normalize(m.gate_up_proj.weight.view(m.n, 2, m.E, C)[:, 0].float(), dim=-1)  # (n, E, C)
            w = F.normalize(gate.mean(1), dim=-1) * m.lte.router_init_std  # (n, C)
        else:
            w = torch.randn(m.router.weight.shape, generator=gen) * m.lte.router_init_std
        m.router.weight.copy_(w)
        m.router_offset.fill_(m.lte.router_init_bias)


def fit_routers(model: Transformer, inputs: Tensor, keep: float, refit: bool, seed: int = 0) -> None:
    """Fit every router to the training-free oracle's choice on the FFN inputs (L, N, C) (Deja Vu's recipe: binary
    cross-entropy), all layers in one batched problem, then shift each offset so that the router keeps `keep` of the
    experts on those tokens, as the oracle does; with `refit`, then refit each down projection (`refit_down`)."""
    layers = lte_layers(model)
    with torch.no_grad():  # the oracle's choice per layer and token (L, N, n)
        y = torch.stack(
            [
                torch.cat([m.magnitude_choice(m.hidden(c.float()), keep) for c in x.split(4096)])
                for m, x in zip(layers, inputs)
            ]
        )
    L, N, C = inputs.shape
    w = torch.zeros(L, C, y.shape[-1], requires_grad=True)
    b = torch.zeros(L, 1, y.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=FIT_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, FIT_STEPS)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(FIT_STEPS):
        idx = torch.randint(0, N, (FIT_BATCH,), generator=gen)
        logits = torch.baddbmm(b, inputs[:, idx].float(), w)  # (L, B, n)
        loss = F.binary_cross_entropy_with_logits(logits, y[:, idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        for m, x, w_l, b_l in zip(layers, inputs, w, b):
            logits = x[:8192].float() @ w_l + b_l  # (N', n)
            shift = torch.quantile(logits.flatten(), 1 - keep)  # keep `keep` of the experts on these tokens
            m.router.weight.copy_(w_l.t())
            m.router_offset.copy_(b_l[0] - shift)
            if refit:
                refit_down(m, x)


@torch.no_grad()
def refit_down(m: LTEMLP, x: Tensor, ridge: float = 1e-3) -> None:
    """Refit the down projection of an LTE FFN so that, routed hard by its router, it best reproduces its dense
    output on the inputs x (N, C): W = argmin ||(on * h) W^T - h W0^T||^2 + ridge * mean(diag A) ||W||^2, with h (N,
    F) the neurons' activations, on (N, F) the router's choice per neuron and A = (on*h)^T (on*h). The ridge keeps
    the solve well posed (an expert the router never picks gets a zero block: it is never read)."""
    Fd = m.n * m.E
    A = torch.zeros(Fd, Fd, dtype=torch.float64)
    B = torch.zeros(Fd, m.down_proj.weight.shape[0], dtype=torch.float64)
    for xb in x.split(4096):
        xb = xb.float()  # (b, C)
        h = m.hidden(xb)  # (b, n, E)
        on = m.logits(xb) > 0  # (b, n): the hard routing of inference and stage 2
        hm = (h * on.unsqueeze(-1)).flatten(-2).double()  # (b, F)
        y = m.down_proj(h.flatten(-2)).double()  # (b, C): the dense output, the target
        A += hm.t() @ hm
        B += hm.t() @ y
    A.diagonal().add_(ridge * A.diagonal().mean())
    m.down_proj.weight.copy_(torch.linalg.solve(A, B).t())  # (C, F)
