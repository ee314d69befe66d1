"""random-LTD (arXiv 2211.11586; DeepSpeed's data_routing/random_ltd): random layerwise token dropping in training.

Every block except the first and the last (`ltd.exempt`) processes only r of the n tokens of each sample, drawn
uniformly without replacement per layer and per sample at every forward; the dropped rows skip the block (identity).
r grows linearly from r_min to n over `ltd.schedule_steps` (the paper's MSLG), after which training is ordinary.

    kept   r(t) = min(n, q * floor(floor(r_min + (t / T) * (n - r_min)) / q))       (DeepSpeed's fixed_linear)
    block  keep = sort(uniform draw of r of the n positions)                        (per layer, per sample)
           y = x;  y[keep] = block(x[keep], cos[keep], sin[keep])                  (out-of-place scatter)

Kept tokens keep their ORIGINAL RoPE angles (cos/sin gathered at their positions; DeepSpeed leaves positions alone,
which is right only for learned absolute embeddings) and attend causally among themselves: the positions are sorted,
so kept token j may see kept token i exactly when i <= j, a plain causal mask over the r-token subsequence.

random-LTD is a way of training, not an architecture (scope "train": the training config's `ltd:` section). While a
run trains it is the model's token router; it adds no modules, so checkpoints, `eval()` (validation) and generation
are the plain model's. The training loop counts LayerTokens (one token through one layer) from the router's `flow`
for every run, so the LayerToken learning-rate schedule (`optim.lr_index: layer_tokens`) and the LayerToken budget
(`run.layer_token_budget`) treat random-LTD and dense runs alike.

Shapes: B batch, n tokens per window, r kept tokens, C width, D head dim, G independent draws (dropping layers, or 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from leanlm.errors import LeanLMError
from leanlm.methods.base import Method
from leanlm.model import ModelConfig, Stream, TokenRouter, Transformer

SCHEDULES = ("linear", "constant")


@dataclass
class LTDConfig:
    """The `ltd:` section of a training config (DeepSpeed's key in brackets)."""

    enabled: bool = True  # false: train dense with the same config (the fair baseline: `--set ltd.enabled=false`)
    r_min: int = 128  # kept tokens per dropping layer at step 0 [min_value]
    q: int = 16  # r is rounded down to a multiple of q on the linear schedule [seq_per_step]
    schedule: str = "linear"  # linear: r_min -> n over schedule_steps (MSLG); constant: r_min until schedule_steps
    # T [require_steps]; default and at most: run.steps (with run.layer_token_budget: the dense run's step count)
    schedule_steps: int | None = None
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


def scheduled_length(step: int, n: int, r_min: int, q: int, schedule_steps: int, schedule: str = "linear") -> int:
    """Kept tokens r at 0-based optimizer step `step` out of n (the module docstring's r(t); DeepSpeed's rounding, so
    r(T) can land below n when q does not divide n and reaches n a little after T)."""
    if schedule == "constant":
        return r_min if step < schedule_steps else n
    grown = int(r_min + step / schedule_steps * (n - r_min))  # floor for the non-negative values here
    return min(n, q * (grown // q))


def sample_kept(draws: int, batch: int, n: int, r: int, device: torch.device | None = None) -> Tensor:
    """(draws, batch, r) int64 positions: per row r distinct positions of 0..n-1, uniform, sorted ascending.

    The r largest of n i.i.d. uniform keys are a uniform r-subset (DeepSpeed: multinomial without replacement); one
    batched call for every layer and sample, from the global torch RNG (saved in checkpoints, so resume is exact).
    """
    keys = torch.rand(draws, batch, n, device=device)
    return keys.topk(r, dim=-1, sorted=False).indices.sort(dim=-1).values


class RandomLTD(Method, TokenRouter):
    """random-LTD on any model whose blocks see every token (no other token router): the training loop installs it
    for the run (`setup_run`, then `set_step` each step); outside training mode it routes nothing."""

    name = "ltd"
    Config = LTDConfig
    scope = "train"

    def __init__(self, cfg: LTDConfig):
        super().__init__(cfg)
        self.model: Transformer | None = None
        self.n = 0  # tokens per window (run.seq_len)
        self.schedule_steps = 1  # T, resolved by setup_run
        self.drop: dict[int, int] = {}  # dropping layer -> its draw (0 for all when not layerwise)
        self.r: int | None = None  # this step's kept length; None: nothing dropped yet
        self._keep: Tensor | None = None  # this forward's draws (G, B, r), or None: dense

    def setup_run(self, model_cfg: ModelConfig, seq_len: int, steps: int) -> None:
        """The run's window length and its optimizer steps (a dense run's, with a LayerToken budget); LeanLMError
        naming the key when the section does not fit the model or the run."""
        c = self.cfg
        self.n, self.drop = seq_len, {}
        if not c.enabled:  # the dense arm of the same config: nothing dropped, nothing to check against the run
            return
        if c.r_min > seq_len:
            raise LeanLMError(f"ltd.r_min={c.r_min} is larger than the sequence (run.seq_len={seq_len})")
        exempt = c.exempt_layers(model_cfg.n_layers)
        self.schedule_steps = c.schedule_steps or steps
        if self.schedule_steps > steps:
            raise LeanLMError(
                f"ltd.schedule_steps={self.schedule_steps} is longer than the run ({steps} optimizer steps)"
            )
        drop = [i for i in range(model_cfg.n_layers) if i not in exempt]
        self.drop = {layer: g if c.layerwise else 0 for g, layer in enumerate(drop)}

    def kept(self, step: int) -> int:
        """r at optimizer step `step` (the run's n once the schedule ends)."""
        c = self.cfg
        if not self.drop:
            return self.n
        return scheduled_length(step, self.n, c.r_min, c.q, self.schedule_steps, c.schedule)

    def token_router(self) -> TokenRouter | None:
        return self if self.cfg.enabled else None

    def attach(self, model: Transformer) -> None:
        self.model = model

    def set_step(self, model: Transformer, step: int) -> None:
        self.r = self.kept(step) if self.cfg.enabled else self.n

    def train_metrics(self, model: Transformer) -> dict[str, Any]:
        return {"ltd_r": self.r}

    def flow(self, kind: str, length: int | float, step: int | None = None) -> tuple[list, list, float] | None:
        """Training at step `step` (default: the current one): r tokens through each dropping block."""
        r = self.kept(step) if step is not None else self.r
        if kind != "train" or r is None or r >= length:
            return None
        L = self.model.cfg.n_layers
        tokens = [float(r) if i in self.drop else float(length) for i in range(L)]
        return tokens, [(t + 1) / 2 for t in tokens], 0.0

    # -- routing ------------------------------------------------------------------------------------------------------

    def begin(self, s: Stream) -> Stream:
        """Draws every dropping layer's tokens, once per forward (before any block, so a recomputed block would see
        the same tokens); dense in eval mode, in generation, or when r covers the window."""
        m, (B, n) = self.model, s.x.shape[:2]
        self._keep = None
        if m.training and self.r is not None and self.r < n and m.caches is None and self.drop:
            if s.mask is not None:  # a padding mask would have to be gathered per layer; training never passes one
                raise LeanLMError("ltd: random-LTD training expects plain causal windows (no attention mask)")
            draws = len(self.drop) if self.cfg.layerwise else 1
            self._keep = sample_kept(draws, B, n, self.r, s.x.device)  # (G, B, r)
        return s

    def enter(self, i: int, s: Stream) -> Stream:
        """Block i (a dropping one) sees only its kept tokens, each with its original position and RoPE rows."""
        if self._keep is None or i not in self.drop:
            return s
        keep = self._keep[self.drop[i]]  # (B, r) sorted positions
        B, r = keep.shape
        rows = keep.unsqueeze(-1).expand(B, r, s.x.shape[-1])  # (B, r, C)
        angle_rows = keep[:, None, :, None].expand(B, 1, r, s.cos.shape[-1])  # (B, 1, r, D)
        cos = s.cos.expand(B, -1, -1, -1).gather(2, angle_rows)  # (B, 1, r, D)
        sin = s.sin.expand(B, -1, -1, -1).gather(2, angle_rows)
        pos = s.pos.expand(B, -1).gather(1, keep)  # (B, r); no mask: causal over the sorted kept subsequence
        return Stream(s.x.gather(1, rows), pos, cos, sin, outer=s, saved=rows)

    def leave(self, i: int, s: Stream) -> Stream:
        if s.outer is None:
            return s
        outer = s.outer
        # out-of-place: autograd then gives dropped rows the identity gradient and kept rows the block's gradient only
        outer.x = outer.x.scatter(1, s.saved, s.x)
        return outer
