"""Two CPU processes under torchrun (gloo): DDP and FSDP2 give the single-process losses, and their checkpoints
resume in one process."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import write_corpus

from leanlm.training import load_config, train

STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from leanlm.data import prepare

    root = tmp_path_factory.mktemp("dist")
    prepare([str(write_corpus(root / "corpus"))], root / "data", vocab_size=300, progress=False)
    path = root / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": {"dir": str(root / "data")},
                "optim": {"lr": 3e-3, "warmup_steps": 2},
                "run": {
                    "steps": STEPS,
                    "batch_size": 4,
                    "seq_len": 32,
                    "grad_accum": 2,
                    "eval_every": 3,
                    "eval_batches": 2,
                    "save_every": 3,
                    "keep_last": 0,
                    "log_every": 1,
                    "progress": False,
                },
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def single(config, tmp_path_factory) -> list[dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single")
    train(load_config(config, [f"run.out={out}"]))
    return rows(out)


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def torchrun(config: Path, out: Path, *sets: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "leanlm",
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_losses(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "val_loss", "grad_norm"):
            if ra[k] or rb[k]:
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=tol), (ra["step"], k)


def resume_in_one_process(config: Path, out: Path) -> list[dict]:
    """Drop everything after step 3, then continue the run in this (single) process."""
    shutil.rmtree(out / f"step-{STEPS:08d}")
    shutil.rmtree(out / "final")
    res = train(load_config(config, [f"run.out={out}", "run.resume=true"]))
    assert res["world_size"] == 1 and res["steps"] == STEPS
    return rows(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(config, single, tmp_path, strategy):
    out = tmp_path / strategy
    torchrun(config, out, f"run.strategy={strategy}")
    state = torch.load(out / "step-00000003" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["config"]["run"]["strategy"] == strategy
    assert_same_losses(rows(out), single, tol=1e-5)
    assert_same_losses(resume_in_one_process(config, out), single, tol=1e-5)
