"""The method protocol: a toy method added through the registry alone trains, saves, loads and is costed end to end;
methods that would take the same hook are refused; generic code asks methods through the protocol only."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from leanlm import methods as registry
from leanlm.checkpoint import load_model
from leanlm.config import model_config, preset
from leanlm.errors import LeanLMError
from leanlm.methods import Method, build_model, check_compatible, install
from leanlm.methods.ltd import LTDConfig, RandomLTD
from leanlm.model import ModelConfig, Stream, TokenRouter, Transformer
from leanlm.training import config_from_dict, train

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig:
    layer: int = 1  # the block that sees only the even positions in training

    def check(self, model_cfg: ModelConfig) -> None:
        if not 0 <= self.layer < model_cfg.n_layers:
            raise LeanLMError(f"model.toy.layer: must be a layer of the model (got {self.layer!r})")


class Toy(Method, TokenRouter):
    """In training, block `layer` runs on the even positions only, its update scaled by a learned gain that an
    auxiliary loss pulls towards 1; the other tokens skip it. Inference is the dense model's (gain included)."""

    name = "toy"
    Config = ToyConfig

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        self.steps: list[int] = []

    def token_router(self) -> TokenRouter:
        return self

    def attach(self, model: Transformer) -> None:
        self.model = model
        model.toy_gain = nn.Parameter(torch.ones(()))

    def init_weights(self, model: Transformer, seed: int | None) -> None:
        model.toy_gain.data.fill_(1.0)

    def set_step(self, model: Transformer, step: int) -> None:
        self.steps.append(step)

    def aux_loss(self, model: Transformer) -> torch.Tensor:
        return (model.toy_gain - 1).square()

    def train_metrics(self, model: Transformer) -> dict[str, float]:
        return {"toy_gain": float(model.toy_gain.detach())}

    def enter(self, i: int, s: Stream) -> Stream:
        if i != self.cfg.layer or not self.model.training:
            return s
        x = s.x[:, ::2]  # (B, ceil(T/2), C)
        return Stream(x, s.pos[..., ::2], s.cos[..., ::2, :], s.sin[..., ::2, :], outer=s, saved=x)

    def leave(self, i: int, s: Stream) -> Stream:
        if s.outer is None:
            return s
        outer = s.outer
        delta = torch.zeros_like(outer.x)
        delta[:, ::2] = self.model.toy_gain * (s.x - s.saved)
        outer.x = outer.x + delta
        return outer

    def flow(self, kind: str, length, step=None):
        if kind != "train":
            return None
        tokens = [float(math.ceil(length / 2)) if i == self.cfg.layer else float(length) for i in range(3)]
        return tokens, [(t + 1) / 2 for t in tokens], 0.0


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "toy", Toy)  # the one registry line a new method adds


def test_a_toy_method_through_the_registry_trains_saves_and_loads(toy, tmp_path):
    from conftest import TEXT

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 20)
    raw = {
        "model": {"preset": "tiny", "n_layers": 3, "vocab_size": 300, "max_seq_len": 64, "toy": {"layer": 1}},
        "data": {"inputs": [str(corpus)], "vocab_size": 300},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "run": {"out": str(tmp_path / "run"), "steps": 6, "batch_size": 2, "seq_len": 32, "log_every": 1},
    }
    res = train(config_from_dict(raw))
    assert res["steps"] == 6 and math.isfinite(res["val_loss"])
    # its FLOPs: block 1 runs on 16 of the 32 tokens of each window
    dense = Transformer(preset("tiny", n_layers=3, vocab_size=300, max_seq_len=64)).flops("train", 32)
    assert res["flops_per_token"] < dense
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "toy_gain" in rows[0].split(",") and len(rows) == 7
    model, _ = load_model(str(tmp_path / "run" / "final"))
    assert model.cfg.arch == "toy" and isinstance(model.methods[0], Toy) and model.router is model.methods[0]
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model"]["toy"] == {"layer": 1}
    assert float(model.toy_gain.detach()) != 1.0  # trained, saved and loaded with the model
    with pytest.raises(LeanLMError, match=r"model\.toy\.layer: must be a layer"):
        preset("tiny", toy={"layer": 5})
    with pytest.raises(LeanLMError, match=r"unknown key 'model\.toy\.depth'"):
        model_config({"preset": "tiny", "toy": {"depth": 1}})


def test_the_toy_method_gets_every_step_and_its_loss(toy):
    model = build_model(preset("tiny", n_layers=3, toy={"layer": 1})).init_weights(0)
    toy_method = model.methods[0]
    x = torch.randint(0, 512, (2, 9))
    model.train()
    toy_method.set_step(model, 0)
    logits = model(x)
    (logits.logsumexp(-1).mean() + toy_method.aux_loss(model)).backward()
    assert model.toy_gain.grad is not None and model.toy_gain.grad != 0  # reached through the routed block
    model.eval()
    with torch.no_grad():  # inference routes nothing: with gain 1 it is the plain dense model with the same weights
        dense = Transformer(model.cfg.replace(methods={}))
        dense.load_state_dict({k: v for k, v in model.state_dict().items() if k != "toy_gain"})
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)


def test_methods_that_take_the_same_hook_are_refused():
    sub = build_model(preset("tiny", n_layers=3, subllm={"structure": "T(T)T"}))
    with pytest.raises(LeanLMError, match="ltd: subllm already routes this model's tokens"):
        install(sub, [RandomLTD(LTDConfig(r_min=8, q=4))])
    lte_cfg = preset("tiny", lte={"expert_size": 32})
    twice = [registry.REGISTRY["lte"](lte_cfg.methods["lte"]) for _ in range(2)]
    with pytest.raises(LeanLMError, match="lte: lte already builds this model's FFN"):
        check_compatible(lte_cfg, twice)
    check_compatible(preset("tiny", n_layers=3, subllm={"structure": "T(T)T"}, lte={"expert_size": 32}), [])


GENERIC = [p for p in (ROOT / "leanlm").rglob("*.py") if "methods" not in p.parts and p.name not in ("demo.py",)]


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_generic_code_asks_methods_through_the_protocol(path):
    """No `hasattr` probes, and no method's name as a string (config.py's presets name sections as keywords)."""
    tree = ast.parse(path.read_text())
    probes = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "hasattr"]
    assert not probes, f"hasattr at lines {probes}"
    names = {"subllm", "lte", "ltd", "random-ltd"}
    strings = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    assert not strings, f"a method's name at lines {strings}"
