"""research/lte/sweep.py end to end on the tiny preset: a dense run, LTE stage 1 and stage 2 for one eta, one
continuation of both, the training-free baseline, sweep.json and sweep.png (a few steps each; ~15 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from leanlm.data import text_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "research" / "lte" / "sweep.py"


def test_sweep_tiny(tmp_path):
    # small slices of the shipped texts: tokenizing and scoring them is quick
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text(text_file("wikitext-2-valid").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    test.write_text(text_file("wikitext-2").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(SCRIPT), "--init", "tiny", "--train", str(train), "--test", str(test), "--etas", "1"]
    cmd += ["--stage1-steps", "2", "--stage2-steps", "1", "--continue-steps", "1", "--seq-len", "32"]
    cmd += ["--expert-size", "16", "--router-init-bias", "0", "--eval-seq-len", "64", "--eval-windows", "2"]
    cmd += ["--device", "cpu", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    result = json.loads((out / "sweep.json").read_text())
    assert set(result) == {"date", "args", "pretrained_ppl", "points", "dense_ppl_by_steps"}
    assert (out / "sweep.png").stat().st_size > 0
    # stage 1 and stage 2 after 3 steps, then stage 2 continued by 1: the dense reference at both budgets
    assert [(p["stage"], p["steps"]) for p in result["points"]] == [(1, 2), (2, 3), (2, 4)]
    assert set(result["dense_ppl_by_steps"]) == {"3", "4"}
    for point in result["points"]:
        assert point["eta"] == 1.0 and point["ppl"] > 1
        assert 0 <= point["sparsity"] < 1
        assert len(point["report"]["ffn_sparsity_per_layer"]) == 2  # the tiny preset's layers
    for point in result["points"][1:]:  # stage 2: next to the training-free baseline at about its sparsity
        assert point["training_free_ppl"] > 1
        assert abs(point["training_free_sparsity"] - point["sparsity"]) <= 0.1  # 10 experts of 16: steps of 0.1
    for run in ("dense", "eta1-stage1", "eta1-stage2", "dense-cont1", "eta1-stage2-cont1"):
        assert (out / run / "final").is_dir(), run
