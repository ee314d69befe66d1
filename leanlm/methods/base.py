"""The method protocol: everything leanlm asks of an efficiency method, each with a default that does nothing.

A method is one class (a `Method` subclass) with its config dataclass, in one file of this package, and one line in
the registry (`leanlm/methods/__init__.py`). What calls each hook:

    building (leanlm.methods.build_model, add_methods)
        Config          the config dataclass: `model.<name>` (scope "model", saved with the model) or the training
                        config's `<name>` section (scope "train": a way of training; the model stays the baseline)
        Config.check    validate the section against the backbone (ModelConfig) or the run; one LeanLMError naming
                        the key
        ffn_factory     the FFN of every block (the model's FFN hook), or None
        attention_factory  the attention of every block (None for a layer: the baseline's), or None
        token_router    the model's TokenRouter (which tokens each block sees), or None; one per model
        attach          add modules or buffers outside the blocks
        init_weights    initialise what the method added (after the baseline's init)
        convert         carry a trained model's weights into this method's layout (e.g. dense -> LTE experts)
    training (leanlm.training.loop)
        check_training  refuse a model this method makes untrainable (packed quantized weights), one LeanLMError
        setup_run       a training method learns the run (window length, steps) before the training loop installs it
        lr_scales       parameters to learn at a multiple of the base learning rate
        set_step        the optimizer step, before its forward (schedules)
        aux_loss        an extra loss term of the last forward, or None
        train_metrics   diagnostics of the last training step (metrics.csv columns)
        calibrate       an explicit step on calibration windows (e.g. SUBLLM's inference thresholds); returns what it
                        set, which the caller logs and saves with the model
    measuring (leanlm.bench, leanlm.evaluate, leanlm.cli, leanlm.demo)
        executed FLOPs  through the model's hooks: `TokenRouter.flow` and `MLP.flops_per_token` (Transformer.flops)
        reset_stats     start measuring inference statistics
        report          what the method did since: a dict with a one-line "summary"

A method gets the model in every hook; where a hook needs the model's state between calls it keeps it on itself
(one method object per model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from leanlm.errors import LeanLMError
from leanlm.model import MLP, Attention, ModelConfig, TokenRouter, Transformer


class NeedsCalibration(LeanLMError):
    """A conversion that calibrates on text was given none (`convert` raises it before any work)."""


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    scope: ClassVar[str] = "model"  # "model" | "train"
    retired_keys: ClassVar[tuple[str, ...]] = ()  # keys older checkpoints may hold in the section: dropped on load
    adds_weights: ClassVar[bool] = True  # False: the section may be added to a saved model at load (--set)

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- building -----------------------------------------------------------------------------------------------------

    def ffn_factory(self, model_cfg: ModelConfig) -> Callable[[int], MLP] | None:
        return None

    def attention_factory(self, model_cfg: ModelConfig) -> Callable[[int], Attention | None] | None:
        return None

    def token_router(self) -> TokenRouter | None:
        return None

    def attach(self, model: Transformer) -> None:
        pass

    def init_weights(self, model: Transformer, seed: int | None) -> None:
        """Initialise what the method added to a model built from scratch (after the baseline's init)."""

    def convert(self, model: Transformer, source: Transformer, seed: int, calibration: Tensor | None) -> None:
        """`model` was just built with this method and holds `source`'s weights where the names match; make the
        rest (seeded with `seed`; `calibration`: token rows (S, T) of text, for a method that converts by what the
        model does on text). By default: new parts as `init_weights` makes them; a section the source already has
        must stay as it is (override to allow a change)."""
        old = source.cfg.methods.get(self.name)
        if old is None:
            self.init_weights(model, seed)
        elif old != self.cfg:
            raise LeanLMError(f"the model already has {self.name}={old!r}; cannot change it to {self.cfg!r}")

    def set_config(self, model: Transformer, **changes: Any) -> None:
        """Change this method's config on the method and in the model's config (saved with the model)."""
        self.cfg = dataclasses.replace(self.cfg, **changes)
        model.cfg = model.cfg.replace(methods={**model.cfg.methods, self.name: self.cfg})

    # -- training -----------------------------------------------------------------------------------------------------

    def lr_scales(self, model: Transformer) -> dict[str, float]:
        """Parameters (by name) to learn at a multiple of the base learning rate."""
        return {}

    def check_training(self) -> None:
        """Raise a LeanLMError if a model with this method (as configured) cannot train."""

    def setup_run(self, model_cfg: ModelConfig, seq_len: int, steps: int) -> None:
        """A training method (scope "train") learns the run before it is installed: the model, the window length and
        the optimizer steps of the run (of a dense run, under a LayerToken budget)."""

    def set_step(self, model: Transformer, step: int) -> None:
        pass

    def aux_loss(self, model: Transformer) -> Tensor | None:
        return None

    def train_metrics(self, model: Transformer) -> dict[str, float]:
        return {}

    def calibrate(self, model: Transformer, batches: list[Tensor]) -> dict[str, Any]:
        return {}

    # -- measuring ----------------------------------------------------------------------------------------------------

    def reset_stats(self, model: Transformer) -> None:
        pass

    def report(self, model: Transformer) -> dict[str, Any]:
        return {}
