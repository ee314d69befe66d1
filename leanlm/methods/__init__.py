"""Efficiency methods as plug-ins: the registry, and the functions that build a model with its methods.

Adding a method is one file in this package (a `Method` subclass with its config dataclass, base.py says what each
hook is for), one line in REGISTRY and its tests; docs/design.md walks through it. The three methods are the
examples: SUBLLM (a token router), random-LTD (a token router used only in training) and LTE (an FFN).

    from leanlm.config import preset
    from leanlm.methods import build_model
    model = build_model(preset("tiny", lte={"expert_size": 32})).init_weights(seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from leanlm.errors import LeanLMError
from leanlm.methods.attention import SparseAttentionMethod
from leanlm.methods.base import Method
from leanlm.methods.ltd import RandomLTD
from leanlm.methods.lte import LTE
from leanlm.methods.quant import Quant
from leanlm.methods.subllm import SubLLM
from leanlm.model import ModelConfig, Transformer

# name -> method class; the name is its config key (`model.<name>`, or `<name>` in a training config). The order is
# the order methods attach in: quantization last, after the others built their layers
REGISTRY: dict[str, type[Method]] = {m.name: m for m in (SubLLM, RandomLTD, LTE, SparseAttentionMethod, Quant)}


# model keys a conversion may change beside method sections: they hold no weights (extending a pretrained model's
# context, LongGen's recipe: a training config's run.init with these keys)
CONTEXT_KEYS = ("max_seq_len", "rope_theta", "rope_scaling")


def names(scope: str) -> list[str]:
    """The registered methods of a scope: "model" (sections of a model config) or "train" (of a training config)."""
    return [name for name, m in REGISTRY.items() if m.scope == scope]


def build_model(cfg: ModelConfig) -> Transformer:
    """A fresh (uninitialised) model for `cfg`: the dense baseline with the methods its config names plugged in.
    Call `.init_weights(seed)` on the result, or load weights into it."""
    methods = [REGISTRY[name](section) for name, section in cfg.methods.items()]
    check_compatible(cfg, methods)  # before building: the FFN factory is the first hook used
    factories = [f for m in methods if (f := m.ffn_factory(cfg)) is not None]
    attention = [f for m in methods if (f := m.attention_factory(cfg)) is not None]
    model = Transformer(cfg, ffn=factories[0] if factories else None, attn=attention[0] if attention else None)
    install(model, methods)
    return model


def check_compatible(cfg: ModelConfig, methods: Sequence[Method]) -> None:
    """Refuse methods that would take the same hook: one FFN and one token router per model. `methods`: the model's
    own (cfg's sections) and any training method meant to join them."""
    own = {m.name for m in methods}
    everyone = [*(REGISTRY[n](s) for n, s in cfg.methods.items() if n not in own), *methods]
    hooks = {
        "builds this model's FFN": lambda m: m.ffn_factory(cfg),
        "builds this model's attention": lambda m: m.attention_factory(cfg),
        "routes this model's tokens": lambda m: m.token_router(),
    }
    for hook, uses in hooks.items():
        users = [m.name for m in everyone if uses(m) is not None]
        if len(users) > 1:
            raise LeanLMError(f"{users[-1]}: {users[0]} already {hook}; they cannot be combined")


def install(model: Transformer, methods: Sequence[Method]) -> None:
    """Plug method objects into a built model: its token router (one per model), their modules, the protocol."""
    check_compatible(model.cfg, [*model.methods, *methods])
    for m in methods:
        router = m.token_router()
        if router is not None:
            model.router = router
        m.attach(model)
        model.methods = (*model.methods, m)


def calibrate_methods(model: Transformer, batches: list[Tensor]) -> dict[str, Any]:
    """Every method's explicit calibration step on token batches (`Method.calibrate`): what each set, by key."""
    out: dict[str, Any] = {}
    for m in model.methods:
        out.update(m.calibrate(model, batches))
    return out


def add_methods(source: Transformer, cfg: ModelConfig, seed: int = 0, calibration: Tensor | None = None) -> Transformer:
    """Turn a trained model into the architecture `cfg` describes: the same backbone weights, the methods' new parts
    made by each method (`Method.convert`), e.g. a pretrained LLaMA uptrained into a SUBLLM, or grouped into LTE's
    experts. calibration: token rows (S, T) of text, for a method that converts by what the model does on text."""
    context = {k: getattr(cfg, k) for k in CONTEXT_KEYS}
    if source.cfg.backbone().replace(**context) != cfg.backbone():
        raise LeanLMError(f"cannot convert into {cfg.arch}: the model's backbone differs from the configured one")
    removed = [name for name in source.cfg.methods if name not in cfg.methods]
    if removed:
        raise LeanLMError(f"the model has {removed[0]}; converting cannot remove a method")
    new = build_model(cfg)  # not initialised: the source's weights, then each method makes its new parts
    _, unexpected = new.load_state_dict(source.state_dict(), strict=False)
    if unexpected:
        raise LeanLMError(f"cannot convert {source.cfg.arch} into {cfg.arch}: unexpected weight {unexpected[0]!r}")
    for m in new.methods:
        m.convert(new, source, seed, calibration)
    return new.to(next(source.parameters()).dtype)


__all__ = [
    "CONTEXT_KEYS",
    "REGISTRY",
    "Method",
    "add_methods",
    "build_model",
    "calibrate_methods",
    "check_compatible",
    "install",
    "names",
]
