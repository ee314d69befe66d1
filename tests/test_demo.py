"""`leanlm demo`: refuses foreign directories (fast); the quick demo end to end (slow: ~1-2 minutes)."""

from __future__ import annotations

import pytest

from leanlm.demo import run_demo
from leanlm.errors import LeanLMError


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(LeanLMError, match="thesis.tex"):
        run_demo(tmp_path, quick=True, progress=False)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_quick_demo_writes_report_and_plots(tmp_path):
    res = run_demo(tmp_path / "demo", quick=True, progress=False)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| dense |" in report and "speed-up vs dense" in report
    assert all((tmp_path / "demo" / p).is_file() for p in ("loss_curves.png", "speed_memory.png"))
    dense = res["rows"][0]
    assert dense["speedup"] == pytest.approx(1.0) and dense["val_loss"] < 8.0
    # a second run in the same directory reuses the prepared data and replaces its own runs
    run_demo(tmp_path / "demo", quick=True, progress=False)
