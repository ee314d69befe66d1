"""Training loop, configs, schedules, checkpoints and exact resume, on a tiny model and a tiny synthetic corpus."""

from __future__ import annotations

import argparse
import csv
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from leanlm.checkpoint import load_model
from leanlm.cli import build_parser
from leanlm.config import apply_overrides, preset
from leanlm.errors import LeanLMError
from leanlm.methods import build_model, install
from leanlm.methods.base import Method
from leanlm.model import TokenRouter, Transformer
from leanlm.training import config_from_dict, load_config, loop, section_keys, train
from leanlm.training.distill import DistillConfig, distill_loss, load_teacher
from leanlm.training.optim import OptimConfig, build_optimizer, lr_at, param_groups
from leanlm.training.state import checkpoint_dirs

WORDS = "the quick brown fox jumps over the lazy dog and runs away from the big red barn".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(root: Path, n_docs: int = 12, words: int = 800) -> Path:
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory) -> Path:
    from leanlm.data import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([str(corpus)], out, vocab_size=300, progress=False)
    return out


def make_cfg(out: Path, data_dir: Path, model: dict | None = None, **run):
    raw = {
        "model": model or {"preset": "tiny"},
        "data": {"dir": str(data_dir)},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "run": {
            "out": str(out),
            "steps": 8,
            "batch_size": 4,
            "seq_len": 32,
            "eval_every": 4,
            "eval_batches": 2,
            "save_every": 4,
            "log_every": 1,
            "progress": False,
            **run,
        },
    }
    return config_from_dict(raw)


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def building_with(method_factory):
    """A stand-in for the loop's `build_model`: the model of the config plus a test method (a fresh object per
    model) that the loop drives through the method protocol like any other."""

    def build(model_cfg):
        model = build_model(model_cfg)
        install(model, [method_factory()])
        return model

    return build


# ---------------------------------------------------------------------------------------------------------------------
# schedules and optimizer


def test_warmup_cosine_hand_computed():
    kw = dict(lr=1.0, total_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.5)
    assert lr_at(1, **kw) == pytest.approx(1.0)
    assert lr_at(2, **kw) == pytest.approx(1.0)  # p = 0
    assert lr_at(6, **kw) == pytest.approx(0.55)  # p = 4/8: halfway between 1 and 0.1
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    assert lr_at(10, **kw) == pytest.approx(0.1)
    assert lr_at(0, **{**kw, "warmup_steps": 0}) == pytest.approx(1.0)


def test_wsd_and_constant_hand_computed():
    kw = dict(lr=1.0, total_steps=10, warmup_steps=2, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.3)
    assert [lr_at(s, **kw) for s in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.7, 0.4])
    const = dict(lr=2.0, total_steps=10, warmup_steps=4, schedule="constant")
    assert [lr_at(s, **const) for s in (0, 3, 4, 9)] == pytest.approx([0.5, 2, 2, 2])
    with pytest.raises(LeanLMError, match="unknown schedule"):
        lr_at(0, lr=1.0, total_steps=10, schedule="linear")


def test_decay_groups():
    model = Transformer(preset("tiny", tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.embed_tokens.weight for p in decay["params"])  # embeddings decay (tied head: once)
    assert any(p is model.norm.weight for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, betas=[0.8, 0.9]))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0] and opt.defaults["betas"] == (0.8, 0.9)


# ---------------------------------------------------------------------------------------------------------------------
# configs


def test_config_errors_name_the_key(tmp_path, data_dir):
    base = {"model": {"preset": "tiny"}, "data": {"dir": str(data_dir)}, "run": {"out": str(tmp_path)}}
    with pytest.raises(LeanLMError, match=r"unknown key 'run\.stepz'.*allowed in run: out, steps"):
        config_from_dict({**base, "run": {"stepz": 3}})
    with pytest.raises(LeanLMError, match=r"run\.steps: expected int, got str"):
        config_from_dict(apply_overrides(base, ["run.steps=many"], section_keys()))
    with pytest.raises(LeanLMError, match=r"unknown key 'optim\.learning_rate'.*lr"):
        apply_overrides(base, ["optim.learning_rate=1"], section_keys())
    with pytest.raises(LeanLMError, match="unknown section 'trainer'"):
        apply_overrides(base, ["trainer.steps=1"], section_keys())
    with pytest.raises(LeanLMError, match="expected SECTION.KEY=VALUE"):
        apply_overrides(base, ["steps"], section_keys())
    with pytest.raises(LeanLMError, match=r"model\.dim: expected int"):
        config_from_dict({**base, "model": {"preset": "tiny", "dim": "wide"}})
    with pytest.raises(LeanLMError, match="model.preset: unknown preset 'huge'"):
        config_from_dict({**base, "model": {"preset": "huge"}})
    with pytest.raises(LeanLMError, match="model: missing section"):
        config_from_dict({k: v for k, v in base.items() if k != "model"})
    with pytest.raises(LeanLMError, match="exactly one of data.dir"):
        config_from_dict({**base, "data": {}})
    with pytest.raises(LeanLMError, match="optim.schedule: must be one of"):
        config_from_dict({**base, "optim": {"schedule": "linear"}})
    # PyYAML reads 3e-4 (no dot) as a string; float fields take it, with --set or in a file
    sets = ["optim.lr=3e-4", "optim.betas=[0.9, 0.99]"]
    cfg = config_from_dict(apply_overrides(base, sets, section_keys()))
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.model == preset("tiny")


# ---------------------------------------------------------------------------------------------------------------------
# training


def test_loss_decreases_and_outputs(tmp_path, corpus):
    from leanlm.checkpoint import load_model

    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny", "vocab_size": 512},
                "data": {"inputs": [str(corpus)], "vocab_size": 300},
                "optim": {"lr": "3e-3", "warmup_steps": 3},
                "run": {
                    "out": str(out),
                    "steps": 30,
                    "batch_size": 4,
                    "seq_len": 32,
                    "eval_every": 10,
                    "eval_batches": 2,
                    "save_every": 0,
                    "log_every": 5,
                    "progress": False,
                },
            }
        )
    )
    res = train(load_config(config))
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    # layer-averaged tokens (the third column) are the plain tokens of a dense run
    assert list(rows[0])[:3] == ["step", "tokens", "layer_tokens"]
    assert [int(r["layer_tokens"]) for r in rows] == [int(r["tokens"]) for r in rows] == [640 * s for s in range(1, 7)]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 1.5
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[2] == pytest.approx(res["val_loss"])
    assert res["steps"] == 30 and res["tokens"] == 30 * 4 * 32 and res["tokens_per_s"] > 0
    assert float(rows[0]["flops_per_token"]) == res["flops_per_token"] > 0
    assert (out / "loss.png").stat().st_size > 0 and any((out / "tensorboard").iterdir())
    assert not list(out.glob("step-*"))  # save_every 0: only final/
    # the written config is complete and loads back to the same thing
    assert load_config(out / "config.yaml").to_dict() == load_config(config).to_dict()
    model, tok = load_model(str(out / "final"))
    assert tok is not None and model.cfg == preset("tiny")


def test_exact_resume(tmp_path, data_dir, monkeypatch):
    straight = tmp_path / "straight"
    train(make_cfg(straight, data_dir))

    class CrashAtStep4(Method):
        name = "crash"

        def set_step(self, model, step: int) -> None:  # the hook the loop calls before each step
            if step == 4:
                raise RuntimeError("simulated crash")

    split = tmp_path / "split"
    monkeypatch.setattr(loop, "build_model", building_with(lambda: CrashAtStep4(None)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(split, data_dir))
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(split)] == ["step-00000004"]
    res = train(make_cfg(split, data_dir, resume=True))

    assert res["steps"] == 8
    assert without_timing(metrics(split)) == without_timing(metrics(straight))  # identical losses at every step
    a, b = (load_file(str(out / "final" / "model.safetensors")) for out in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(split / "step-00000008" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 8 and state["tokens"] == 8 * 4 * 32 and state["data"]["step"] == 8
    assert {"torch", "numpy", "python"} <= state["rng"].keys()
    assert state["config"]["run"]["resume"] is True and "embed_tokens.weight" in state["optimizer"]["state"]


def test_corrupt_latest_falls_back_and_keep_last(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    train(make_cfg(out, data_dir, steps=6, save_every=2, keep_last=2))
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000004", "step-00000006"]
    first = without_timing(metrics(out))
    state = out / "step-00000006" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn write
    capsys.readouterr()
    res = train(make_cfg(out, data_dir, steps=6, save_every=2, keep_last=2, resume=True))
    err = capsys.readouterr().err
    assert "warning" in err and "step-00000006" in err and "resuming from" in err and "step-00000004" in err
    assert res["steps"] == 6 and without_timing(metrics(out)) == first
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000004", "step-00000006"]
    with pytest.raises(LeanLMError, match="already holds checkpoints"):
        train(make_cfg(out, data_dir))


@pytest.mark.parametrize("source", ["logits", "aux_loss"])
def test_non_finite_loss_stops_without_saving_it(tmp_path, data_dir, monkeypatch, source):
    class NaNFromStep3(Method, TokenRouter):
        """From step 3 on (0-based) a NaN in the training forward's last hidden states (so in the logits) through
        the token-routing hook, or in the auxiliary loss."""

        name = "nan"
        step = 0

        def token_router(self):
            return self if source == "logits" else None

        def attach(self, model) -> None:
            self.model = model

        def set_step(self, model, step: int) -> None:
            self.step = step

        def leave(self, i, s):
            if self.model.training and self.step >= 3 and i == len(self.model.layers) - 1:
                s.x = s.x * math.nan
            return s

        def aux_loss(self, model):
            return torch.tensor(math.nan if source == "aux_loss" and self.step >= 3 else 0.0)

    monkeypatch.setattr(loop, "build_model", building_with(lambda: NaNFromStep3(None)))
    out = tmp_path / "run"
    with pytest.raises(LeanLMError, match=r"^step 4: (loss|gradient norm) is nan") as e:
        train(make_cfg(out, data_dir, save_every=1, keep_last=0))
    assert "\n" not in str(e.value) and "step-00000003" in str(e.value)
    assert [p.name for p in checkpoint_dirs(out)] == [f"step-0000000{i}" for i in (1, 2, 3)]
    assert not (out / "final").exists()
    for ckpt in checkpoint_dirs(out):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_vocab_mismatch(tmp_path, data_dir):
    cfg = make_cfg(tmp_path / "run", data_dir, model={"preset": "tiny", "vocab_size": 290})
    with pytest.raises(LeanLMError, match="vocab mismatch: .* 300 token ids but the model has 290"):
        train(cfg)


def test_finetune_from_checkpoint_via_cli(tmp_path, data_dir, corpus):
    pretrained = tmp_path / "pre"
    tied = {"preset": "tiny", "tie_embeddings": True}
    res = train(make_cfg(pretrained, data_dir, model=tied, steps=20, eval_every=0, save_every=0, log_every=20))
    config = tmp_path / "ft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"inputs": [str(corpus)]},
                "optim": {"lr": 1e-4, "warmup_steps": 0},
                "run": {
                    "steps": 2,
                    "batch_size": 4,
                    "seq_len": 32,
                    "eval_batches": 2,
                    "log_every": 1,
                    "progress": False,
                },
            }
        )
    )
    ap = build_parser()
    verbs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    parser = verbs.choices["train"]
    for action in parser._actions:
        assert action.help, action.dest
    out = tmp_path / "ft"
    args = ap.parse_args(
        [
            "train",
            "--config",
            str(config),
            "--init",
            str(pretrained / "final"),
            "--out",
            str(out),
            "--set",
            "run.seed=1",
            "--json",
        ]
    )
    ft = args.fn(args)
    rows = metrics(out)
    # the data was tokenized with the init model's tokenizer and training starts from its weights, not from scratch
    assert float(rows[0]["loss"]) < res["loss"] + 0.3 < math.log(512)
    assert ft["steps"] == 2 and Path(ft["checkpoint"]) == out / "final"
    assert load_config(out / "config.yaml").model == preset("tiny", tie_embeddings=True)


# ---------------------------------------------------------------------------------------------------------------------
# knowledge distillation


@pytest.fixture(scope="module")
def teacher_ckpt(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(make_cfg(out, data_dir, steps=10, eval_every=0, save_every=0, log_every=10))
    return out / "final"


def with_distill(cfg, **distill):
    import dataclasses

    return dataclasses.replace(
        cfg,
        distill=DistillConfig(**distill),
        optim=dataclasses.replace(cfg.optim, weight_decay=0.0),
    )


def test_distill_loss_hand_computed():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # (B, T, V)
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    assert distill_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-6)
    assert distill_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_distill_gradient_vanishes_at_the_teacher(teacher_ckpt):
    # a student equal to its teacher gets (up to float rounding) no gradient from the KL term, unlike the CE term
    from leanlm.checkpoint import load_model

    student, _ = load_model(str(teacher_ckpt))
    teacher = load_teacher(DistillConfig(str(teacher_ckpt)), 512, 32, torch.device("cpu"))
    x, y = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    logits = student.train()(x)  # (B, T, V)
    kd = distill_loss(logits, teacher(x), temperature=2.0)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    params = list(student.parameters())
    kd_norm = torch.cat([g.flatten() for g in torch.autograd.grad(kd, params, retain_graph=True)]).norm()
    ce_norm = torch.cat([g.flatten() for g in torch.autograd.grad(ce, params)]).norm()
    assert kd.item() == pytest.approx(0.0, abs=1e-6) and kd_norm < 1e-5 * ce_norm
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_distill_pulls_the_student_to_the_teacher(tmp_path, data_dir, teacher_ckpt):
    from leanlm.checkpoint import load_model

    out = tmp_path / "student"
    cfg = make_cfg(out, data_dir, steps=12, eval_every=0, save_every=0, seed=5)  # a fresh random student
    res = train(with_distill(cfg, teacher=str(teacher_ckpt), weight=1.0, temperature=2.0))
    kl = [float(r["distill_kl"]) for r in metrics(out)]
    assert kl[-1] < 0.5 * kl[0]
    assert load_config(out / "config.yaml").distill == DistillConfig(str(teacher_ckpt), 1.0, 2.0)
    # executed FLOPs count the teacher's forward on top of the student's forward + backward
    teacher, _ = load_model(str(teacher_ckpt))
    student, _ = load_model(str(out / "final"))
    assert res["flops_per_token"] == pytest.approx(student.flops("train", 32) + teacher.flops("prefill", 32))


def test_distill_bad_input(tmp_path, data_dir, corpus, teacher_ckpt):
    base = {"model": {"preset": "tiny"}, "data": {"dir": str(data_dir)}, "run": {"out": str(tmp_path / "r")}}
    for distill, msg in [
        ({}, "distill.teacher: required"),
        ({"teacher": "t", "weight": 1.5}, r"distill.weight: must be in \[0, 1\]"),
        ({"teacher": "t", "temperature": 0}, "distill.temperature: must be > 0"),
        ({"teacher": "t", "alpha": 1}, "unknown key 'distill.alpha'"),
    ]:
        with pytest.raises(LeanLMError, match=msg):
            config_from_dict({**base, "distill": distill})
    # a missing teacher fails before the text is prepared
    raw = {"model": {"preset": "tiny"}, "data": {"inputs": [str(corpus)], "vocab_size": 300}}
    raw["run"] = {"out": str(tmp_path / "missing"), "steps": 1, "seq_len": 32, "progress": False}
    raw["distill"] = {"teacher": str(tmp_path / "no-such-teacher")}
    with pytest.raises(LeanLMError, match="no-such-teacher: no such file or directory"):
        train(config_from_dict(raw))
    assert not (tmp_path / "missing" / "data").exists()
    cfg = make_cfg(tmp_path / "vocab", data_dir, model={"preset": "tiny", "vocab_size": 600}, steps=1)
    with pytest.raises(LeanLMError, match="vocab size 512 differs from the model's 600"):
        train(with_distill(cfg, teacher=str(teacher_ckpt)))
    cfg = make_cfg(tmp_path / "context", data_dir, model={"preset": "tiny", "max_seq_len": 512}, steps=1, seq_len=300)
    with pytest.raises(LeanLMError, match="its context of 256 is shorter than run.seq_len=300"):
        train(with_distill(cfg, teacher=str(teacher_ckpt)))


def test_context_extension_with_sparse_attention(tmp_path, data_dir):
    """LongGen's recipe: run.init with context keys and an attention section extends a short-context model; the
    weights carry over unchanged and the saved model is the sparse one at the longer context."""
    pre = tmp_path / "pre"
    train(make_cfg(pre, data_dir, model={"preset": "tiny", "max_seq_len": 32}, steps=2, eval_every=0, save_every=0))
    sections = {"max_seq_len": 128, "attention": {"pattern": "sink_window", "block": 8, "sink": 8, "window": 16}}
    cfg = config_from_dict(
        {
            "model": sections,
            "data": {"dir": str(data_dir)},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "run": {
                "init": str(pre / "final"),
                "out": str(tmp_path / "ext"),
                "steps": 2,
                "batch_size": 2,
                "seq_len": 96,
                "eval_batches": 1,
                "progress": False,
            },
        }
    )
    train(cfg)
    model, _ = load_model(str(tmp_path / "ext" / "final"))
    assert model.cfg.max_seq_len == 128 and model.cfg.arch == "attention"
    assert model.cfg.methods["attention"].layers == [0, 1]
