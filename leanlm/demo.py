"""`leanlm demo`: the main job on the embedded default corpus, end to end.

Prepares the Python standard library's sources (always present, offline), trains the dense baseline and the methods
that train from scratch (SUBLLM, random-LTD) at a small size on the same tokens with the same seed, evaluates them on
the held-out documents, benchmarks their training step alternately in one process, and writes `<out>/report.md` with
PNG plots (loss curves, speed-up and memory bars). LTE is not a row: it converts a fine-tuned pretrained model
(configs/lte-smollm2-wikitext.yaml).

    leanlm demo              # under 10 minutes on 2 CPU cores (three methods)
    leanlm demo --quick      # under 2 minutes: a tiny model, few steps
"""

from __future__ import annotations

import csv
import datetime
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanlm.config import ModelConfig, preset
from leanlm.errors import LeanLMError


@dataclass
class Method:
    """One row of the demo: a name, how it changes the model config, and a line saying what it is."""

    name: str
    about: str
    model_overrides: dict = field(default_factory=dict)  # applied to the size's preset; "{steps}" = the run's steps
    ltd: dict | None = None  # a random-LTD training section (leanlm.ltd.LTDConfig), "{half}" = seq_len // 2


# Every method that trains from scratch gets a row here; the dense baseline is the reference for all ratios.
METHODS: list[Method] = [
    Method("dense", "the LLaMA baseline (leanlm/model.py): every token through every layer and the whole FFN"),
    Method(
        "subllm",
        "SUBLLM (leanlm/subllm.py): a learned scorer keeps 64% of the tokens for the middle layers, twice nested",
        # the paper's layout (outer, stage 1, stage 2, stage 1, outer) at the demo's 6 layers; its 8k/20k-step
        # schedules shortened to the demo's run; inference thresholds calibrated to keep 64% (docs/design.md)
        {
            "subllm": {
                "structure": "T(T(TT)T)T",
                "balancer_steps": "{steps}",
                "bypass_steps": "{steps}",
                "calibrate": True,
            }
        },
    ),
    Method(
        "random-ltd",
        "random-LTD (leanlm/ltd.py): middle layers see a random half of the tokens, growing to all during the run",
        ltd={"r_min": "{half}", "q": 16},
    ),
]


@dataclass
class DemoSize:
    model: str
    model_overrides: dict
    vocab_size: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    eval_batches: int
    bench_steps: int


SIZES = {
    "full": DemoSize(
        "cpu-10m",
        {"max_seq_len": 256},
        vocab_size=8192,
        steps=100,  # x 3 methods: the whole demo stays under 10 minutes on 2 cores
        batch_size=8,
        seq_len=256,
        lr=1.5e-3,
        eval_batches=8,
        bench_steps=5,
    ),
    "quick": DemoSize(
        "tiny",
        {"vocab_size": 2048, "max_seq_len": 128, "n_layers": 6},  # 6 layers: room for SUBLLM's two nested stages
        vocab_size=2048,
        steps=60,
        batch_size=8,
        seq_len=128,
        lr=3e-3,
        eval_batches=4,
        bench_steps=3,
    ),
}


def _train_config(size: DemoSize, method: Method, data_dir: Path, out: Path, progress: bool):
    from leanlm.ltd import LTDConfig
    from leanlm.optim import OptimConfig
    from leanlm.train import DataConfig, RunConfig, TrainConfig

    def fill(d: dict) -> dict:  # the per-size placeholders of METHODS
        values = {"{steps}": size.steps, "{half}": size.seq_len // 2}
        return {k: fill(v) if isinstance(v, dict) else values.get(v, v) for k, v in d.items()}

    model_cfg: ModelConfig = preset(size.model, **{**size.model_overrides, **fill(method.model_overrides)})
    return TrainConfig(
        model=model_cfg,
        ltd=LTDConfig(**fill(method.ltd)) if method.ltd is not None else None,
        data=DataConfig(dir=str(data_dir)),
        optim=OptimConfig(lr=size.lr, warmup_steps=max(1, size.steps // 10), schedule="cosine"),
        run=RunConfig(
            out=str(out),
            steps=size.steps,
            batch_size=size.batch_size,
            seq_len=size.seq_len,
            eval_every=max(1, size.steps // 6),
            eval_batches=size.eval_batches,
            save_every=0,
            keep_last=1,
            log_every=max(1, size.steps // 30),
            progress=progress,
        ),
    )


def _read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _plots(out: Path, rows: list[dict], curves: dict[str, list[dict]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("leanlm demo: matplotlib is not installed, no plots (pip install 'leanlm[plot]')", file=sys.stderr)
        return []
    made = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, metrics in curves.items():
        train = [(int(r["step"]), float(r["loss"])) for r in metrics if r.get("loss")]
        val = [(int(r["step"]), float(r["val_loss"])) for r in metrics if r.get("val_loss")]
        line = ax.plot(*zip(*train), alpha=0.6, label=f"{name} train")[0]
        if val:
            ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("leanlm demo: loss curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    made.append("loss_curves.png")

    names = [r["method"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar(names, [r["speedup"] for r in rows], color="tab:blue")
    a1.axhline(1.0, color="gray", lw=1)
    a1.set_title("training-step speed-up vs dense")
    a2.bar(names, [(r["peak_mem_bytes"] or 0) / 2**20 for r in rows], color="tab:orange")
    a2.set_title("training-step peak extra memory (MiB)")
    fig.tight_layout()
    fig.savefig(out / "speed_memory.png", dpi=120)
    plt.close(fig)
    made.append("speed_memory.png")
    return made


DEMO_FILES = {"data", "runs", "report.md", "loss_curves.png", "speed_memory.png"}  # what a demo directory holds


def run_demo(out: str | Path = "demo", quick: bool = False, progress: bool = True) -> dict:
    """Run the whole demo into `out`; returns the report's table as a dict."""
    from leanlm.bench import bench_train_step
    from leanlm.checkpoint import load_checkpoint
    from leanlm.data import prepare

    out = Path(out)
    size = SIZES["quick" if quick else "full"]
    runs = out / "runs"
    # hidden entries are temporaries of an interrupted earlier demo (atomic writes)
    foreign = (
        [p.name for p in out.iterdir() if p.name not in DEMO_FILES and not p.name.startswith(".")]
        if out.is_dir()
        else []
    )
    if foreign or (out.exists() and not out.is_dir()):
        raise LeanLMError(
            f"{out}: exists and holds files the demo did not write ({', '.join(foreign[:3]) or out.name});"
            " choose another --out"
        )
    if runs.exists():  # the demo's own scratch from an earlier run; the prepared data is kept and reused
        shutil.rmtree(runs)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[demo {time.perf_counter() - t0:5.0f}s] {msg}", file=sys.stderr)

    # ---- data: the embedded default corpus --------------------------------------------------------------------------
    say("preparing the Python standard library corpus")
    manifest = prepare(["stdlib"], out / "data", vocab_size=size.vocab_size, progress=progress)

    # ---- train every method on the same tokens, same seed -----------------------------------------------------------
    summaries, curves = {}, {}
    for m in METHODS:
        from leanlm.train import train

        say(f"training {m.name}")
        summaries[m.name] = train(_train_config(size, m, out / "data", runs / m.name, progress))
        curves[m.name] = _read_metrics(runs / m.name / "metrics.csv")

    # ---- benchmark the training step: all methods alternately, several rounds ---------------------------------------
    say("benchmarking training steps")
    models = {m.name: load_checkpoint(runs / m.name / "final", expect_arch=None)[0].train() for m in METHODS}
    for m in METHODS:  # random-LTD is a way of training: bench its step at the schedule's midpoint, the run's mean r
        if m.ltd is not None:
            from leanlm.ltd import RandomLTD, resolve_plan

            cfg = _train_config(size, m, out / "data", runs / m.name, progress)
            plan, _ = resolve_plan(cfg.ltd, cfg.model, size.seq_len, size.batch_size, size.steps, None)
            RandomLTD(models[m.name], plan).attach().set_step(size.steps // 2)
    tps: dict[str, list[float]] = {n: [] for n in models}
    mem: dict[str, int | None] = dict.fromkeys(models)
    for r in range(size.bench_steps):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            res = bench_train_step(models[name], size.batch_size, size.seq_len, steps=1, warmup=1 if r == 0 else 0)
            tps[name] += res["tokens_per_s"]
            if res["peak_mem_bytes"] is not None:
                mem[name] = max(mem[name] or 0, res["peak_mem_bytes"])

    def median(xs: list[float]) -> float:
        return float(torch.tensor(xs).median())

    base = "dense"
    rows = []
    for m in METHODS:
        s = summaries[m.name]
        ratios = [a / b for a, b in zip(tps[m.name], tps[base])]
        rows.append(
            {
                "method": m.name,
                "about": m.about,
                "params": s["params"],
                "flops_per_token": s["flops_per_token"],
                "flop_ratio": summaries[base]["flops_per_token"] / s["flops_per_token"],
                "train_tokens_per_s": median(tps[m.name]),
                "peak_mem_bytes": mem[m.name],
                "val_loss": s["val_loss"],
                "val_loss_ratio": s["val_loss"] / summaries[base]["val_loss"],
                "speedup": median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "train_seconds": s["train_seconds"],
            }
        )

    # ---- report -----------------------------------------------------------------------------------------------------
    plots = _plots(out, rows, curves)
    lines = [
        "# leanlm demo report",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"- corpus: Python {platform.python_version()} standard library sources, {manifest['documents']} documents, "
        f"{manifest['train_tokens']:,} train / {manifest['val_tokens']:,} validation tokens "
        f"(held-out documents), byte-level BPE of {manifest['vocab_size']} tokens",
        f"- every method: model `{size.model}` {size.model_overrides}, {size.steps} steps of {size.batch_size} x "
        f"{size.seq_len} tokens, seed 0, AdamW lr {size.lr} warmup+cosine",
        f"- training-step speed: forward+backward+AdamW on {size.batch_size} x {size.seq_len} tokens, methods run "
        f"alternately, {size.bench_steps} rounds; speed-up = method tokens/s / dense tokens/s in the same round, "
        "median [min, max]; random-LTD's step at its schedule's midpoint (the run's mean kept length)",
        "- validation: every model in eval mode (SUBLLM: threshold selection, random-LTD: the dense model)",
        "",
        "| method | parameters | executed FLOPs/token (train) | FLOP saving | train tokens/s | peak extra memory "
        "| val loss | val loss / dense | speed-up vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem_s = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB" if r["peak_mem_bytes"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M | {r['flop_ratio']:.2f}x "
            f"| {r['train_tokens_per_s']:,.0f} | {mem_s} | {r['val_loss']:.4f} | {r['val_loss_ratio']:.3f} "
            f"| {r['speedup']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] |"
        )
    lines += ["", "Methods:", ""] + [f"- **{r['method']}**: {r['about']}" for r in rows]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    lines += ["", f"Total demo time: {time.perf_counter() - t0:.0f} s. Checkpoints: `{runs}/<method>/final`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    say(f"wrote {out / 'report.md'}")
    return {
        "report": str(out / "report.md"),
        "plots": [str(out / p) for p in plots],
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
