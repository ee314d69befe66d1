"""random-LTD (arXiv 2211.11586; DeepSpeed's data_routing/random_ltd): random layerwise token dropping in training.

Every block except the first and the last (`ltd.exempt`) processes only r of the n tokens of each sample, drawn
uniformly without replacement per layer and per sample at every forward; the dropped rows skip the block (identity).
r grows linearly from r_min to n over `ltd.schedule_steps` (the paper's MSLG), after which training is ordinary.

    kept   r(t) = min(n, q * floor(floor(r_min + (t / T) * (n - r_min)) / q))       (DeepSpeed's fixed_linear)
    block  keep = sort(uniform draw of r of the n positions)                        (per layer, per sample)
           y = x;  y[keep] = block(x[keep], cos[keep], sin[keep])                  (out-of-place scatter)
    LT_t   = samples * (r * L_drop + n * (L - L_drop))   LayerTokens of step t (r = n once the ramp ends)

Kept tokens keep their ORIGINAL RoPE angles (cos/sin gathered at their positions; DeepSpeed leaves positions alone,
which is right only for learned absolute embeddings) and attend causally among themselves: the positions are sorted,
so kept token j may see kept token i exactly when i <= j, a plain causal mask over the r-token subsequence.

random-LTD is a training-time wrapper, not an architecture: `RandomLTD(model, ...)` replaces the dense model's
forward while it trains and adds no modules, so the state dict, checkpoints, `eval()` (validation) and generation are
the plain dense model's. The training loop (leanlm/train.py) counts LayerTokens with `LayerTokenPlan` for random-LTD
and dense runs alike, so the LayerToken learning-rate schedule (`optim.lr_index: layer_tokens`) and the LayerToken
budget (`run.layer_token_budget`) treat both arms identically.

Shapes: B batch, n tokens per window, r kept tokens, C width, D head dim, G independent draws (dropping layers, or 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Transformer, dense_flops_per_token

SCHEDULES = ("linear", "constant")


@dataclass
class LTDConfig:
    """The `ltd:` section of a training config (DeepSpeed's key in brackets)."""

    enabled: bool = True  # false: train dense with the same config (the fair baseline: `--set ltd.enabled=false`)
    r_min: int = 128  # kept tokens per dropping layer at step 0 [min_value]
    q: int = 16  # r is rounded down to a multiple of q on the linear schedule [seq_per_step]
    schedule: str = "linear"  # linear: r_min -> n over schedule_steps (MSLG); constant: r_min until schedule_steps
    schedule_steps: int | None = None  # T [require_steps]; default: run.steps, or the dense step count of the budget
    layerwise: bool = True  # each dropping layer draws its own subset; false: one subset shared by all of them
    exempt: list | None = None  # layers that always see the whole sequence, negative = from the end; default [0, -1]

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"ltd.{name}: {why} (got {getattr(self, name)!r})")

        if self.r_min < 1:
            raise bad("r_min", "must be >= 1")
        if self.q < 1:
            raise bad("q", "must be >= 1")
        if self.schedule == "linear" and self.q > self.r_min:
            raise bad("q", f"must be <= r_min={self.r_min}, or r(0) rounds down to 0 tokens")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise bad("schedule_steps", "must be >= 1")
        if self.exempt is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in self.exempt):
            raise bad("exempt", "must be a list of layer indices")

    def exempt_layers(self, n_layers: int) -> list[int]:
        """The exempt layer indices, normalised to 0..n_layers-1; LeanLMError if one is out of range."""
        exempt = [0, -1] if self.exempt is None else self.exempt
        out_of_range = [i for i in exempt if not -n_layers <= i < n_layers]
        if out_of_range:
            raise LeanLMError(
                f"ltd.exempt: layer {out_of_range[0]} is out of range for a {n_layers}-layer model "
                f"(valid: {-n_layers}..{n_layers - 1})"
            )
        return sorted({i % n_layers for i in exempt})


def kept_length(step: int, n: int, r_min: int, q: int, schedule_steps: int, schedule: str = "linear") -> int:
    """Kept tokens r at 0-based optimizer step `step` out of n (the module docstring's r(t); DeepSpeed's rounding, so
    r(T) can land below n when q does not divide n and reaches n a little after T)."""
    if schedule == "constant":
        return r_min if step < schedule_steps else n
    grown = int(r_min + step / schedule_steps * (n - r_min))  # floor for the non-negative values here
    return min(n, q * (grown // q))


# ---------------------------------------------------------------------------------------------------------------------
# LayerToken accounting, for random-LTD and dense runs alike


@dataclass
class LayerTokenPlan:
    """Kept length and LayerTokens per optimizer step of one run; `ltd=None` (or disabled) is the dense baseline.

    LayerTokens count one token passing one layer. `layer_tokens(step) / n_layers` is the layer-averaged token count
    that Megatron-DeepSpeed logs as "consumed tokens": for a dense run simply the tokens of the step.
    """

    n: int  # tokens per window (run.seq_len)
    n_layers: int
    samples: int  # windows per optimizer step: batch_size * grad_accum
    ltd: LTDConfig | None = None
    schedule_steps: int = 1  # T, resolved

    def __post_init__(self) -> None:
        if self.ltd is not None and not self.ltd.enabled:
            self.ltd = None
        exempt = self.ltd.exempt_layers(self.n_layers) if self.ltd is not None else list(range(self.n_layers))
        self.drop_layers = [i for i in range(self.n_layers) if i not in exempt]

    @property
    def tokens_per_step(self) -> int:
        return self.samples * self.n

    def kept(self, step: int) -> int:
        if self.ltd is None or not self.drop_layers:
            return self.n
        c = self.ltd
        return kept_length(step, self.n, c.r_min, c.q, self.schedule_steps, c.schedule)

    def layer_tokens(self, step: int) -> int:
        """LayerTokens consumed by optimizer step `step`."""
        r, L_drop = self.kept(step), len(self.drop_layers)
        return self.samples * (r * L_drop + self.n * (self.n_layers - L_drop))

    def steps_for_budget(self, budget: int) -> int:
        """Optimizer steps until at least `budget` layer-averaged tokens are consumed (the last step may overshoot)."""
        target, consumed, step = budget * self.n_layers, 0, 0
        while consumed < target:
            consumed += self.layer_tokens(step)
            step += 1
        return step

    def total_layer_tokens(self, steps: int) -> int:
        return sum(self.layer_tokens(t) for t in range(steps))


def resolve_plan(
    cfg: LTDConfig | None, model_cfg: ModelConfig, n: int, samples: int, steps: int, budget: int | None
) -> tuple[LayerTokenPlan, int]:
    """The run's LayerTokenPlan and its number of optimizer steps (run.steps, or enough for `budget` layer-averaged
    tokens); LeanLMError naming the key for a random-LTD setting that does not fit the model or the run."""
    ltd = cfg if cfg is not None and cfg.enabled else None
    dense_steps = -(-budget // (samples * n)) if budget is not None else steps  # ceil: the dense run's length
    if ltd is not None:
        if model_cfg.arch != "llama":
            raise LeanLMError(f"ltd: random-LTD wraps the dense model's blocks; not supported for {model_cfg.arch}")
        if ltd.r_min > n:
            raise LeanLMError(f"ltd.r_min={ltd.r_min} is larger than the sequence (run.seq_len={n})")
        ltd.exempt_layers(model_cfg.n_layers)
    T = (ltd.schedule_steps if ltd is not None else None) or dense_steps
    plan = LayerTokenPlan(n=n, n_layers=model_cfg.n_layers, samples=samples, ltd=ltd, schedule_steps=T)
    total = plan.steps_for_budget(budget) if budget is not None else steps
    if ltd is not None and T > total:
        raise LeanLMError(f"ltd.schedule_steps={T} is longer than the run ({total} optimizer steps)")
    return plan, total


# ---------------------------------------------------------------------------------------------------------------------
# the wrapped forward


def sample_kept(draws: int, batch: int, n: int, r: int, device: torch.device | None = None) -> Tensor:
    """(draws, batch, r) int64 positions: per row r distinct positions of 0..n-1, uniform, sorted ascending.

    The r largest of n i.i.d. uniform keys are a uniform r-subset (DeepSpeed: multinomial without replacement); one
    batched call for every layer and sample, from the global torch RNG (saved in checkpoints, so resume is exact).
    """
    keys = torch.rand(draws, batch, n, device=device)
    return keys.topk(r, dim=-1, sorted=False).indices.sort(dim=-1).values


def drop_tokens(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, keep: Tensor) -> Tensor:
    """Run `block` on the kept rows of x only; dropped rows pass through unchanged.

    x: (B, n, C); cos, sin: (1 or B, 1, n, D) for the n positions; keep: (B, r) sorted positions. Returns (B, n, C).
    """
    B, r = keep.shape
    rows = keep.unsqueeze(-1).expand(B, r, x.shape[-1])  # (B, r, C)
    angle_rows = keep[:, None, :, None].expand(B, 1, r, cos.shape[-1])  # (B, 1, r, D)
    cos_k = cos.expand(B, -1, -1, -1).gather(2, angle_rows)  # (B, 1, r, D): each kept token's original angle
    sin_k = sin.expand(B, -1, -1, -1).gather(2, angle_rows)
    y = block(x.gather(1, rows), cos_k, sin_k)  # (B, r, C); no mask = causal over the sorted kept subsequence
    # out-of-place: autograd then gives dropped rows the identity gradient and kept rows the block's gradient only
    return x.scatter(1, rows, y)


def ltd_flops_per_token(cfg: ModelConfig, n: int, r: int, drop_layers: int, training: bool = False) -> float:
    """Executed FLOPs per window token when `drop_layers` blocks process r of the n tokens (model.py's counting)."""
    head = 2 * cfg.dim * cfg.vocab_size

    def block(context: float) -> float:  # one block, per token it processes
        return dense_flops_per_token(cfg.replace(n_layers=1), context) - head

    full = cfg.n_layers - drop_layers
    fwd = full * block((n + 1) / 2) + drop_layers * block((r + 1) / 2) * r / n + head
    return 3 * fwd if training else fwd


class RandomLTD:
    """Random-LTD on a dense `Transformer` in training: `attach()` replaces the model's forward, `detach()` restores it.

    No modules are added, so the state dict is the dense model's. The forward is the dense one whenever the model is
    in eval mode, the current r covers the whole input, or a KV cache / explicit mask is in use (generation).
    """

    def __init__(self, model: Transformer, plan: LayerTokenPlan):
        if not isinstance(model, Transformer) or type(model).forward is not Transformer.forward:
            raise LeanLMError(f"ltd: random-LTD wraps the dense model's blocks; not supported for {model.cfg.arch}")
        self.model, self.plan = model, plan
        self.drop = set(plan.drop_layers)
        self.layerwise = plan.ltd is None or plan.ltd.layerwise
        self.r = plan.n  # set_step sets the step's r; until then nothing is dropped

    def attach(self) -> RandomLTD:
        self.model.forward = self.forward  # an instance attribute: nn.Module.__call__ (and DDP, FSDP) call it
        return self

    def detach(self) -> None:
        self.model.__dict__.pop("forward", None)

    def set_step(self, step: int) -> None:
        self.r = self.plan.kept(step)

    def flops_per_token(self, training: bool = True) -> float:
        """Executed FLOPs per window token at the current r."""
        n = self.plan.n
        if self.r >= n:
            return self.model.flops_per_token(n, training=training)
        return ltd_flops_per_token(self.model.cfg, n, self.r, len(self.drop), training)

    def forward(
        self,
        idx: Tensor,
        pos: Tensor | None = None,
        start: int = 0,
        mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        m = self.model
        B, n = idx.shape
        if not m.training or self.r >= n or m.caches is not None or not self.drop:
            return Transformer.forward(m, idx, pos, start, mask, last_only)  # r = n: exactly the dense model
        if mask is not None:  # a padding mask would have to be gathered per layer; training never passes one
            raise LeanLMError("ltd: random-LTD training expects plain causal windows (no attention mask)")
        # drawn here, once per forward and outside any checkpointed block, so a recomputed block sees the same tokens
        keep = sample_kept(len(self.drop) if self.layerwise else 1, B, n, self.r, idx.device)  # (G, B, r)
        x = m.embed_tokens(idx)  # (B, n, C)
        cos, sin, _ = m.rope_rows(pos, start, n, x)  # (1 or B, 1, n, D)
        g = 0
        for i, layer in enumerate(m.layers):
            if i in self.drop:
                x = drop_tokens(layer, x, cos, sin, keep[g if self.layerwise else 0])
                g += 1
            else:
                x = layer(x, cos, sin)
        return m.logits(x, last_only)  # (B, n, vocab)


__all__ = [
    "LTDConfig",
    "LayerTokenPlan",
    "RandomLTD",
    "drop_tokens",
    "kept_length",
    "ltd_flops_per_token",
    "resolve_plan",
    "sample_kept",
]
