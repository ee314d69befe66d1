"""AdamW with decay / no-decay parameter groups, and learning-rate schedules as pure functions of the step.

Weight decay applies to every parameter with two or more dimensions (the matmul weights and the token embedding, as
in nanoGPT and LLaMA) and not to vectors (RMSNorm gains, biases): decaying a gain towards zero changes what the
layer computes rather than regularising it. A tied lm_head is the embedding, so it is decayed once.

Schedules map the 0-based index of an optimizer update to its learning rate:

    warmup      step < warmup_steps:  lr * (step + 1) / warmup_steps
    cosine      then lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total - warmup)
    wsd         then lr until the last decay_fraction * total steps, then linear towards lr_min (warmup-stable-decay)
    constant    then lr

with lr_min = lr * min_lr_ratio. Like nanoGPT's, the decaying schedules reach lr_min at step == total, one step after
the last update, so the last update still moves the weights when min_lr_ratio is 0. `lr_index: layer_tokens`
evaluates the same schedule at the consumed layer-averaged tokens counted in dense steps (random-LTD's LayerToken LR,
`schedule_lr_layer_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from leanlm.errors import LeanLMError
from leanlm.model import TokenRouter, Transformer

SCHEDULES = ("cosine", "wsd", "constant")
LR_INDEXES = ("steps", "layer_tokens")


@dataclass
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule (the `optim:` section of a training config)."""

    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the schedule decays towards lr * min_lr_ratio
    weight_decay: float = 0.1  # on >= 2-D parameters only
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the fraction of all steps spent decaying at the end
    # steps: the schedule indexes optimizer steps; layer_tokens: it indexes consumed layer-averaged tokens, counted in
    # dense steps (random-LTD's LayerToken LR, see schedule_lr_layer_tokens); identical to `steps` for a dense run
    lr_index: str = "steps"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"optim.{name}: {why} (got {getattr(self, name)!r})")

        if not self.lr > 0:
            raise bad("lr", "must be positive")
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "must be in [0, 1]")
        for name in ("weight_decay", "eps", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        betas_ok = len(self.betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas
        )
        if not betas_ok:
            raise bad("betas", "must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.lr_index not in LR_INDEXES:
            raise bad("lr_index", f"must be one of {', '.join(LR_INDEXES)}")


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate of the update with 0-based index `step` out of `total_steps` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise LeanLMError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    lr_min = lr * min_lr_ratio
    if schedule == "cosine":
        p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        decay_steps = round(decay_fraction * total_steps)
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start or decay_steps == 0:
            return lr
        p = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return lr - (lr - lr_min) * p
    return lr


def schedule_lr(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """`lr_at` with the schedule of an `OptimConfig`."""
    return lr_at(
        step,
        lr=cfg.lr,
        total_steps=total_steps,
        warmup_steps=cfg.warmup_steps,
        schedule=cfg.schedule,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.decay_fraction,
    )


def schedule_lr_layer_tokens(consumed: float, total: float, tokens_per_step: int, cfg: OptimConfig) -> float:
    """The LayerToken LR (random-LTD): the step schedule evaluated at `consumed / tokens_per_step` dense steps.

    `consumed` and `total` are layer-averaged tokens (LayerTokens / n_layers) before this update and over the run;
    `tokens_per_step` those of one full-length step. Warmup and decay thus follow compute, not updates: a random-LTD
    step that runs half the middle layers' tokens advances the schedule by less than a step, and a dense run gets
    exactly `schedule_lr(step, cfg, total_steps)`.
    """
    return schedule_lr(consumed / tokens_per_step, cfg, total / tokens_per_step)  # type: ignore[arg-type]


def param_groups(model: Transformer, weight_decay: float) -> list[dict]:
    """AdamW groups: >= 2-D parameters with `weight_decay`, the rest without. A parameter a method asks to learn at a
    multiple of the base rate (`Method.lr_scales`, e.g. SUBLLM's scorers at 0.5) goes to a group whose `lr_scale` the
    training loop multiplies the scheduled learning rate by."""
    scales = {name: s for m in model.methods for name, s in m.lr_scales(model).items()}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():  # a tied weight once
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, scales.get(name, 1.0)), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] != 1.0))
    ]


def build_optimizer(model: Transformer, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`. Build it after wrapping the model for DDP/FSDP (FSDP replaces its
    parameters in place): `model` is the unwrapped module."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


class LayerTokens:
    """LayerTokens (one token through one layer) of each optimizer step of a run: a training method's token router
    (random-LTD) says how many tokens each block runs at a step (`TokenRouter.flow`); without one, every block runs
    the whole window. `at(step) / n_layers` is the layer-averaged count Megatron-DeepSpeed logs as "consumed tokens";
    for a dense run, simply the tokens of the step."""

    def __init__(self, n_layers: int, seq_len: int, samples: int, router: TokenRouter | None = None):
        self.n_layers, self.n, self.samples, self.router = n_layers, seq_len, samples, router  # samples: per step

    def at(self, step: int) -> int:
        flow = self.router.flow("train", self.n, step) if self.router is not None else None
        return self.samples * round(sum(flow[0]) if flow else self.n * self.n_layers)

    def total(self, steps: int) -> int:
        return sum(self.at(t) for t in range(steps))

    def steps_for(self, budget: int) -> int:
        """Optimizer steps until at least `budget` layer-averaged tokens are consumed (the last may overshoot)."""
        target, consumed, step = budget * self.n_layers, 0, 0
        while consumed < target:
            consumed += self.at(step)
            step += 1
        return step
