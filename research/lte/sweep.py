"""LTE eta sweep: the sparsity-perplexity curve of a model fine-tuned with LTE, next to a dense fine-tune of the same
length and a training-free baseline (keep the experts with the largest mean |activation| per token, TEAL-style).

    python research/lte/sweep.py --init smollm2-135m --train wikitext-2-valid --test wikitext-2 --etas 16,12,8 \\
        --stage1-steps 30 --stage2-steps 10 --batch-size 2 --eval-windows 8 --router-lr-scale 100 \\
        --router-init-bias 1.5 --sep-eps 0.1 --out out/lte2

Per eta it runs what `leanlm train` runs for
    run.init=<init>, model: {lte: {eta: ETA, ...}}                 (stage 1: grouping + routers + soft routing)
    run.init=<stage-1 final>, model: {lte: {stage: 2, ...}}         (stage 2: frozen routers, hard routing)
and evaluates the final model with the `leanlm eval` protocol. The dense reference is fine-tuned for
stage1 + stage2 steps from the same init; the training-free baseline groups the dense fine-tune's neurons the same
way and keeps, per token, as many experts as the LTE point selected on average. `--continue-steps 500,500` then
trains the dense model and every stage 2 further from their ends, in the same amounts, and evaluates each budget.
Runs whose final/ exists are not trained again. Writes <out>/sweep.json and <out>/sweep.png (perplexity vs FFN
sparsity, one series per budget).

`--dense-steps N` fine-tunes the dense reference for N steps instead, and keeps it as the one reference and
training-free baseline source for every point, continuations included (e.g. the best dense model, when longer ones
overfit). `--teacher PATH` distils stage 2 (and its continuations; `--distill-stages 1,2`: stage 1 too) from PATH
(the training option `distill:`, not in the paper), e.g. `--dense-steps 180 --teacher out/x/dense/final --tag=-kd`:
the dense run is trained first, so it can be the teacher. `--stage1-from-dense` starts stage 1 from the dense
reference instead of `--init` (the paper's order: a dense fine-tune, then grouping and stage 1). `--expert-size N`
groups N neurons per expert, for LTE and the training-free baseline alike (default 32, the issue's).

`--train` and `--test` take text files or the names of texts shipped with leanlm (`wikitext-2-valid`, `wikitext-2`).
The training text is tokenized with `--init`'s tokenizer; an init without one (a preset without weights, e.g. `tiny`
for a smoke test: `python -m pytest research`) gets a BPE of its vocabulary size trained on `--train`. Results of
the runs made with it are in docs/lab/lte.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default="smollm2-135m")
    ap.add_argument("--train", default="wikitext-2-valid", help="training text: a file or a shipped text's name")
    ap.add_argument("--test", default="wikitext-2", help="evaluation text: a file or a shipped text's name")
    ap.add_argument("--etas", default="8,12,16", help="comma-separated eta values")
    ap.add_argument("--stage1-steps", type=int, default=30)
    ap.add_argument("--stage2-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="optim.grad_clip (0: none)")
    ap.add_argument("--tag", default="", help="suffix of the LTE run directories and result files")
    ap.add_argument("--router-lr-scale", type=float, default=100.0)
    ap.add_argument("--router-init-bias", type=float, default=1.5, help="model.lte.router_init_bias")
    ap.add_argument("--sep-eps", type=float, default=0.1, help="model.lte.sep_eps")
    ap.add_argument("--router-init", default="random", help="random | centroid | fitted (model.lte.router_init)")
    ap.add_argument("--router-init-std", type=float, default=0.02)
    ap.add_argument("--expert-size", type=int, default=32, help="model.lte.expert_size (LTE and training-free)")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default="out/lte")
    ap.add_argument(
        "--dense-steps",
        type=int,
        help="fine-tune the dense reference for this many steps (default: "
        "stage1 + stage2) and compare every point with it",
    )
    ap.add_argument("--teacher", help="distil the LTE stages of --distill-stages from this model (distill.teacher)")
    ap.add_argument("--distill-stages", default="2", help="comma-separated LTE stages that --teacher distils")
    ap.add_argument("--stage1-from-dense", action="store_true", help="start stage 1 from the dense reference")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda: training (run.device) and evaluation")
    ap.add_argument(
        "--continue-steps",
        default="",
        help="comma-separated: then continue the dense run and every stage 2 by this many more steps, each "
        "continuation from the previous one's end (fresh schedule, seeds 1, 2, ...), and evaluate each (runs "
        "<name>-cont<steps added so far>)",
    )
    args = ap.parse_args()
    try:
        extra = [int(c) for c in args.continue_steps.split(",") if c.strip()]  # steps of each continuation
        if any(n < 1 for n in extra):
            raise ValueError
    except ValueError:
        sys.exit(f"error: --continue-steps must be step counts >= 1, comma-separated (got {args.continue_steps!r})")
    if args.expert_size < 1:
        sys.exit(f"error: --expert-size must be >= 1 (got {args.expert_size})")
    if args.dense_steps is not None and args.dense_steps < 1:
        sys.exit(f"error: --dense-steps must be >= 1 (got {args.dense_steps})")
    distilled = set(args.distill_stages.split(","))  # the LTE stages that --teacher distils
    if not distilled <= {"1", "2"}:
        sys.exit(f"error: --distill-stages must be 1, 2 or 1,2 (got {args.distill_stages!r})")
    torch.set_num_threads(args.threads)

    from leanlm.checkpoint import load_model
    from leanlm.data import prepare, text_file
    from leanlm.errors import LeanLMError
    from leanlm.evaluate import evaluate
    from leanlm.measure import reports, reset_stats
    from leanlm.methods import add_methods
    from leanlm.methods.lte import LTEConfig, set_magnitude_routing
    from leanlm.tokenizer import Tokenizer
    from leanlm.training import config_from_dict, train
    from leanlm.training.distributed import setup

    try:  # the device `leanlm train` would pick for run.device (auto: cuda if available), checked the same way
        dev = setup(args.device).device
    except LeanLMError as e:
        sys.exit(f"error: --device: {e}")

    out = Path(args.out)
    data = out / "data"
    grouping = LTEConfig(expert_size=args.expert_size)  # the training-free baseline's; LTE's runs use the same size
    try:
        test = text_file(args.test)
        base, base_tok = load_model(args.init)
        base.cfg.replace(methods={"lte": grouping})  # before anything is trained: the expert size must fit the FFN
        # the init's tokenizer, or (a preset without weights) a BPE of the model's vocabulary trained on the text
        tokenizer = args.init if base_tok is not None else None
        prepare([args.train], data, tokenizer=tokenizer, vocab_size=base.cfg.vocab_size, progress=False)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    data_tok = Tokenizer.load(data)  # what every trained checkpoint carries
    steps = args.stage1_steps + args.stage2_steps

    def run(name: str, init: str, model: dict | None, n: int, seed: int = 0, teacher: str | None = None) -> Path:
        raw = {
            "data": {"dir": str(data)},
            "optim": {"lr": args.lr, "warmup_steps": 2, "weight_decay": 0.0, "grad_clip": args.grad_clip},
            "run": {
                "init": init,
                "out": str(out / name),
                "steps": n,
                "seed": seed,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "eval_every": 0,
                "eval_batches": 2,
                "save_every": 0,
                "log_every": 5,
                "progress": False,
                "device": dev.type,
            },
        }
        if model:
            raw["model"] = model
        if teacher:
            raw["distill"] = {"teacher": teacher}
        final = out / name / "final"
        if not final.exists():
            t0 = time.time()
            train(config_from_dict(raw))
            print(f"{name}: {n} steps in {time.time() - t0:.0f} s", flush=True)
        return final

    def load(path) -> tuple[torch.nn.Module, object]:
        model, tok = load_model(str(path))
        return model.to(dev), tok or data_tok

    def score(model, tok) -> float:
        """Perplexity on --test; the model's methods count what they did (reset first)."""
        reset_stats(model)
        res = evaluate(model, tok, [test], seq_len=args.eval_seq_len, max_windows=args.eval_windows, progress=False)
        return res["perplexity"]

    rows: list[dict] = []
    base, tok = base.to(dev), base_tok or data_tok
    ppl_base = score(base, tok)
    print(f"pretrained: ppl {ppl_base:.3f}", flush=True)
    del base
    dense_steps = args.dense_steps or steps
    dense_path = run("dense", args.init, None, dense_steps)
    dense, tok = load(dense_path)
    ppl_dense = score(dense, tok)
    print(f"dense fine-tune, {dense_steps} steps: ppl {ppl_dense:.3f}", flush=True)
    lte_common = {
        "router_lr_scale": args.router_lr_scale,
        "router_init_bias": args.router_init_bias,
        "router_init": args.router_init,
        "router_init_std": args.router_init_std,
        "sep_eps": args.sep_eps,
        "expert_size": args.expert_size,
    }
    tag = ("" if args.router_init == "random" else f"-{args.router_init}") + args.tag

    def lte(eta: float, stage: int) -> dict:
        return {"lte": {"eta": eta, "stage": stage, **lte_common}}

    def grouped(dense) -> torch.nn.Module:  # the training-free baseline: same k-means grouping, no training
        return add_methods(dense, dense.cfg.replace(methods={"lte": grouping})).to(dev).eval()

    def point(eta: float, stage: int, n: int, path: Path, baseline: torch.nn.Module | None) -> None:
        model, _ = load(path)
        ppl = score(model, tok)
        rep = reports(model)["lte"]  # after scoring: the sparsity its routers chose on the test text
        row = {"eta": eta, "stage": stage, "steps": n, "ppl": ppl, "sparsity": rep["ffn_sparsity"], "report": rep}
        if baseline is not None:  # the training-free baseline at the same mean sparsity
            set_magnitude_routing(baseline, 1 - rep["ffn_sparsity"])
            row["training_free_ppl"] = score(baseline, tok)
            row["training_free_sparsity"] = reports(baseline)["lte"]["ffn_sparsity"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)

    def teacher(stage: int) -> str | None:
        return args.teacher if str(stage) in distilled else None

    init1 = str(dense_path) if args.stage1_from_dense else args.init
    base_grouped = grouped(dense)
    stage2 = {}
    for eta in [float(e) for e in args.etas.split(",")]:
        s1 = run(f"eta{eta:g}{tag}-stage1", init1, lte(eta, 1), args.stage1_steps, teacher=teacher(1))
        s2 = run(f"eta{eta:g}{tag}-stage2", str(s1), lte(eta, 2), args.stage2_steps, teacher=teacher(2))
        point(eta, 1, args.stage1_steps, s1, None)
        point(eta, 2, steps, s2, base_grouped)
        stage2[eta] = s2
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "pretrained_ppl": ppl_base,
        "points": rows,
    }
    # both arms continue from their own end with the same fresh schedule and a new data order
    dense_ppl, added = {dense_steps: ppl_dense}, 0
    baseline = base_grouped
    for seed, n in enumerate(extra, start=1):
        added += n
        if not args.dense_steps:  # else the one reference stays
            dense_path = run(f"dense-cont{added}", str(dense_path), None, n, seed=seed)
            dense_c, _ = load(dense_path)
            dense_ppl[steps + added] = score(dense_c, tok)
            print(f"dense fine-tune, {steps + added} steps: ppl {dense_ppl[steps + added]:.3f}", flush=True)
            baseline = grouped(dense_c)
        for eta, s2 in stage2.items():
            stage2[eta] = run(
                f"eta{eta:g}{tag}-stage2-cont{added}", str(s2), lte(eta, 2), n, seed=seed, teacher=teacher(2)
            )
            point(eta, 2, steps + added, stage2[eta], baseline)
    result["dense_ppl_by_steps"] = dense_ppl
    (out / f"sweep{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"sweep{tag}.png")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted({p["steps"] for p in result["points"] if p["stage"] == 2})
    dense = {int(n): ppl for n, ppl in result["dense_ppl_by_steps"].items()}  # JSON keys are strings
    # --dense-steps: one reference, and the source of every training-free point
    fixed = next(iter(dense)) if len(dense) == 1 and next(iter(dense)) not in budgets else None
    for i, n in enumerate(budgets):
        pts = sorted((p for p in result["points"] if p["stage"] == 2 and p["steps"] == n), key=lambda p: p["sparsity"])
        color = f"C{i}"
        ax.plot([p["sparsity"] for p in pts], [p["ppl"] for p in pts], "o-", color=color, label=f"LTE, {n} steps")
        for p in pts:
            ax.annotate(f"η={p['eta']:g}", (p["sparsity"], p["ppl"]), fontsize=8)
        tf_s, tf_p = [p["training_free_sparsity"] for p in pts], [p["training_free_ppl"] for p in pts]
        ax.plot(tf_s, tf_p, "s--", color=color, alpha=0.6, label=f"top-|h| of the dense fine-tune, {fixed or n} steps")
        if n in dense:
            ax.axhline(dense[n], color=color, ls=":", label=f"dense fine-tune, {n} steps")
    for n, ppl in dense.items():  # a --dense-steps reference of another length than any LTE budget
        if n not in budgets:
            ax.axhline(ppl, color="gray", ls=":", label=f"dense fine-tune, {n} steps")
    ax.set_xlabel("FFN neuron sparsity")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (wikitext-2 test, log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
