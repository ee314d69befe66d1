"""Benchmarks: result structure, ratio arithmetic, alternation order, HF side, memory probe. No absolute timings."""

from __future__ import annotations

import statistics

import pytest
import torch

from leanlm import bench, measure
from leanlm.bench import format_table, run_bench
from leanlm.checkpoint import load_model
from leanlm.errors import LeanLMError
from leanlm.measure import PeakMemory, TrainStep

SMALL = dict(seq_len=32, prompt_len=8, new_tokens=4, repeats=2, warmup=1)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")[0]


def check_summary(s: dict, n: int) -> None:
    assert len(s["samples"]) == n
    assert s["min"] <= s["median"] <= s["max"]
    assert s["median"] == statistics.median(s["samples"])


def test_run_bench_structure():
    r = run_bench("tiny", **SMALL)
    assert set(r) == {"date", "machine", "settings", "variants", "ratio_definition", "results"}
    assert r["machine"]["threads"] == torch.get_num_threads()
    assert list(r["variants"]) == ["A"]
    a = r["variants"]["A"]
    assert a["params"] > 0 and all(v > 0 for v in a["flops_per_token"].values())
    assert set(a["flops_per_token"]) == {"train", "prefill", "decode"}
    assert set(r["results"]) == {"train", "prefill", "decode"}
    for res in r["results"].values():
        assert "B" not in res and "ratio" not in res
        check_summary(res["A"], 2)
        assert all(t > 0 for t in res["A"]["samples"])
        mem = res["A"]["peak_mem_bytes"]
        assert isinstance(mem, int) and mem >= 0
    assert "A tokens/s" in format_table(r)


def test_ratios_and_alternation(monkeypatch):
    calls = []

    def fake_prefill(model, batch, prompt_len, tokens):
        calls.append(model)
        return 12, float(len(calls))  # each call a different time, so every ratio differs

    monkeypatch.setattr(bench, "prefill", fake_prefill)
    r = run_bench("tiny", vs="tiny", what=["prefill"], repeats=4, warmup=1, prompt_len=8)
    a, b = calls[0], calls[1]  # warmup: A then B
    assert a is not b
    # repeats alternate who goes first: AB, BA, AB, BA
    assert calls[2:] == [a, b, b, a, a, b, b, a]
    rate = [12 / (i + 1) for i in range(len(calls))]
    tps_a = [rate[i] for i in range(2, len(calls)) if calls[i] is a]
    tps_b = [rate[i] for i in range(2, len(calls)) if calls[i] is b]
    res = r["results"]["prefill"]
    assert res["A"]["samples"] == pytest.approx(tps_a)
    assert res["B"]["samples"] == pytest.approx(tps_b)
    assert res["ratio"]["samples"] == pytest.approx([x / y for x, y in zip(tps_a, tps_b)])
    check_summary(res["ratio"], 4)
    assert res["ratio"]["min"] == pytest.approx(min(x / y for x, y in zip(tps_a, tps_b)))


def test_vs_hf():
    pytest.importorskip("transformers")
    r = run_bench("tiny", vs="hf", **SMALL)
    assert r["variants"]["B"]["ref"] == "hf"
    assert r["variants"]["B"]["flops_per_token"] == r["variants"]["A"]["flops_per_token"]
    for res in r["results"].values():
        check_summary(res["B"], 2)
        check_summary(res["ratio"], 2)
        assert res["ratio"]["samples"] == pytest.approx(
            [a / b for a, b in zip(res["A"]["samples"], res["B"]["samples"])]
        )
    table = format_table(r)
    assert "A/B median" in table and "train" in table and "decode" in table


def _train_steps(model, batch: int, seq_len: int, steps: int) -> list[tuple[float, int | None]]:
    step = TrainStep(model, batch, seq_len)
    try:
        step()  # warmup: creates the AdamW state
        return [measure.measure(step, torch.device("cpu")) for _ in range(steps)]
    finally:
        step.close()


def test_train_step(tiny):
    r = _train_steps(tiny, batch=2, seq_len=16, steps=2)
    assert len(r) == 2 and all(t > 0 for t, _ in r)
    assert all(m >= 0 for _, m in r)
    assert not tiny.training and all(p.grad is None for p in tiny.parameters())


def test_prefill_and_decode(tiny):
    cpu = torch.device("cpu")
    p = measure.measure(lambda: measure.prefill(tiny, 2, 8), cpu)
    d = measure.measure(lambda: measure.decode(tiny, 2, 8, 4), cpu)
    for tps, mem in (p, d):
        assert tps > 0 and mem >= 0
    assert tiny.caches is None
    with pytest.raises(LeanLMError, match="at least 2 new tokens"):
        measure.decode(tiny, batch=1, prompt_len=8, new_tokens=1)


def test_steps_in_turn_is_cached_decode_of_each_model():
    """Two different models decode the same tokens step by step in turn: each step's logits are that model's full
    forward at that position (so neither sees the other's cache), and both get timed."""
    models = {"a": load_model("tiny")[0].eval(), "b": load_model("tiny", seed=1)[0].eval()}
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))  # (1, T)
    full = {k: m(tokens) for k, m in models.items()}  # (1, T, V)
    for m in models.values():
        m.setup_caches(1, tokens.shape[1])
        m(tokens[:, :8], last_only=True)
    steps: list[dict] = []
    try:
        elapsed = measure.steps_in_turn(models, tokens, 8, steps.append)
    finally:
        for m in models.values():
            m.reset_caches()
    assert len(steps) == 4 and set(elapsed) == {"a", "b"} and all(t > 0 for t in elapsed.values())
    assert not torch.allclose(full["a"], full["b"])
    for i, out in enumerate(steps):
        for k in models:
            torch.testing.assert_close(out[k][0, -1], full[k][0, 8 + i], atol=1e-4, rtol=1e-4)


def test_hf_runners_do_the_same_work(tiny):
    pytest.importorskip("transformers")
    from leanlm.hf import to_hf_model

    hf = to_hf_model(tiny)
    assert measure.decode(hf, 2, 8, 5)[0] == measure.decode(tiny, 2, 8, 5)[0] == 2 * 4
    assert measure.prefill(hf, 2, 8)[0] == measure.prefill(tiny, 2, 8)[0] == 16
    assert _train_steps(hf, batch=1, seq_len=16, steps=1)[0][0] > 0


def test_peak_memory_sees_an_allocation():
    # x stays alive until the block's exit takes its last sample: deterministic (whether the sampling thread catches a
    # short-lived allocation depends on scheduling, and a loaded CI machine once missed half of one)
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(16 * 2**20)  # 64 MiB, written so the pages are resident
    del x
    if mem.bytes is None:
        pytest.skip("RSS cannot be read on this platform")
    assert mem.bytes >= 48 * 2**20


def test_bad_arguments():
    with pytest.raises(LeanLMError, match="--what"):
        run_bench("tiny", what=["inference"], **SMALL)
    with pytest.raises(LeanLMError, match="exceeds the context"):
        run_bench("tiny", what=["train"], **{**SMALL, "seq_len": 10_000})
    with pytest.raises(LeanLMError, match="--repeats"):
        run_bench("tiny", **{**SMALL, "repeats": 0})
    with pytest.raises(LeanLMError, match="--dtype"):
        run_bench("tiny", dtype="float8", **SMALL)
