"""random-LTD training-step speed vs dense, measured in one process with the variants alternating.

    python benchmarks/ltd_speed.py --preset cpu-10m --seq-len 256 --batch 8 --repeats 10           # r = n/2 vs dense
    python benchmarks/ltd_speed.py --preset cpu-10m --seq-len 256 --batch 8 --schedule --r-min 32 --q 16 \\
        --dense-steps 24                                                # a full schedule vs dense, equal LayerTokens

Two models with the same initial weights, each with its own AdamW, train on the same fixed random tokens (the
`leanlm bench` protocol: leanlm.measure.TrainStep); one of them runs random-LTD (first and last layer exempt), set
up as the training loop sets it up (`RandomLTD.setup_run`, `leanlm.methods.install`, `set_step` before each step).
Executed FLOPs come from `model.flops("train", n)` with the router installed, LayerTokens from
leanlm.training.optim.LayerTokens.

Fixed r (default): every repeat times one dense step and one random-LTD step at r = --r (default n/2), the order
swapped every other repeat; reported: the per-repeat speed-up (median [min, max]) and the executed-FLOP ratio.

--schedule: the random-LTD run follows the linear schedule r_min -> n over --dense-steps steps (T = the dense run's
length) until it has consumed the LayerTokens of --dense-steps dense steps (so it runs more steps); the two runs'
steps are interleaved (dense, LTD, dense, LTD, ... the longer run finishing alone) and each run's step times summed.
Reported: wall-clock and executed FLOPs of both runs, and for the random-LTD run against a dense run of the same
number of steps (same raw tokens) the theoretical saving 1 - FLOPs ratio and the realised 1 - time ratio.

Prints a table and, with --json, one JSON object on the last line. Times depend on the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys

import torch

from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.measure import TrainStep
from leanlm.methods import install
from leanlm.methods.ltd import LTDConfig, RandomLTD
from leanlm.model import Transformer
from leanlm.training.distributed import setup
from leanlm.training.optim import LayerTokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-10m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--r", type=int, default=None, help="kept tokens for the fixed-r comparison (default n/2)")
    ap.add_argument("--schedule", action="store_true", help="a full linear schedule vs dense at equal LayerTokens")
    ap.add_argument("--r-min", type=int, default=32)
    ap.add_argument("--q", type=int, default=16)
    ap.add_argument("--dense-steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and optimizer state")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        dev = setup(args.device).device
    except LeanLMError as e:
        sys.exit(f"error: --device: {e}")

    n = args.seq_len
    try:
        cfg = preset(args.preset, max_seq_len=max(n, 2))
        if args.schedule:  # linear r_min -> n over the dense run's steps
            ltd = RandomLTD(LTDConfig(r_min=args.r_min, q=args.q))
            ltd.setup_run(cfg, n, args.dense_steps)
        else:  # r fixed at --r: a constant schedule, measured at step 0
            ltd = RandomLTD(LTDConfig(r_min=args.r or n // 2, q=1, schedule="constant"))
            ltd.setup_run(cfg, n, 1)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    exempt = ltd.cfg.exempt_layers(cfg.n_layers)
    drop_layers = [i for i in range(cfg.n_layers) if i not in exempt]
    if not drop_layers or ltd.kept(0) >= n:
        why = f"every layer of {args.preset} is exempt" if not drop_layers else f"r = {ltd.kept(0)} keeps all {n}"
        sys.exit(f"error: random-LTD would drop nothing here ({why})")
    dense = Transformer(cfg).init_weights(seed=0).to(dev, getattr(torch, args.dtype))
    model = copy.deepcopy(dense)
    install(model, [ltd])  # random-LTD becomes the model's token router
    step_dense, step_ltd = TrainStep(dense, args.batch, n), TrainStep(model, args.batch, n)
    flops_dense = dense.flops("train", n)
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "preset": args.preset,
        "seq_len": n,
        "batch": args.batch,
        "drop_layers": drop_layers,
    }

    if not args.schedule:
        ltd.set_step(model, 0)
        r = ltd.kept(0)
        for _ in range(args.warmup):
            step_dense(), step_ltd()
        ratios, t_dense, t_ltd = [], [], []
        for i in range(args.repeats):
            order = [(step_dense, t_dense), (step_ltd, t_ltd)]
            for run, times in order if i % 2 == 0 else order[::-1]:
                times.append(run()[1])
            ratios.append(t_dense[-1] / t_ltd[-1])
        flop_ratio = model.flops("train", n) / flops_dense
        res = {
            **info,
            "r": r,
            "dense_step_s": statistics.median(t_dense),
            "ltd_step_s": statistics.median(t_ltd),
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "executed_flop_ratio": flop_ratio,
            "theoretical_speedup": 1 / flop_ratio,
            "realised_fraction_of_saving": (1 - 1 / statistics.median(ratios)) / (1 - flop_ratio),
        }
        print(f"r = {r} of n = {n}, layers {drop_layers} dropping, batch {args.batch}, {args.repeats} repeats")
        print(f"dense step {res['dense_step_s']:.3f} s, random-LTD step {res['ltd_step_s']:.3f} s (medians)")
        print(f"speed-up {res['speedup_median']:.3f} [{res['speedup_min']:.3f}, {res['speedup_max']:.3f}]")
        print(
            f"executed FLOPs ratio {flop_ratio:.3f} (theoretical speed-up {1 / flop_ratio:.3f}); realised "
            f"{100 * res['realised_fraction_of_saving']:.0f}% of the theoretical saving"
        )
    else:
        budget = args.dense_steps * args.batch * n  # layer-averaged tokens of the dense run
        layer_tokens = LayerTokens(model.cfg.n_layers, n, args.batch, router=ltd)
        ltd_steps = layer_tokens.steps_for(budget)
        for _ in range(args.warmup):
            ltd.set_step(model, 0)
            step_dense(), step_ltd()
        t_dense, t_ltd, f_ltd = 0.0, 0.0, 0.0
        for t in range(max(args.dense_steps, ltd_steps)):
            if t < args.dense_steps:
                t_dense += step_dense()[1]
            if t < ltd_steps:
                ltd.set_step(model, t)
                f_ltd += model.flops("train", n)
                t_ltd += step_ltd()[1]
        f_dense = flops_dense * args.dense_steps
        res = {
            **info,
            "r_min": args.r_min,
            "q": args.q,
            "schedule_steps": args.dense_steps,
            "dense_steps": args.dense_steps,
            "ltd_steps": ltd_steps,
            "layer_tokens_dense": LayerTokens(dense.cfg.n_layers, n, args.batch).total(args.dense_steps),
            "layer_tokens_ltd": layer_tokens.total(ltd_steps),
            "dense_s": t_dense,
            "ltd_s": t_ltd,
            "flops_dense": f_dense * args.batch * n,
            "flops_ltd": f_ltd * args.batch * n,
            # against a dense run of the same number of steps (same raw tokens): per-step cost
            "theoretical_saving_same_tokens": 1 - f_ltd / (flops_dense * ltd_steps),
            "realised_saving_same_tokens": 1 - t_ltd / (t_dense / args.dense_steps * ltd_steps),
        }
        res["realised_fraction"] = res["realised_saving_same_tokens"] / res["theoretical_saving_same_tokens"]
        print(
            f"equal LayerToken budget ({budget} layer-averaged tokens): dense {args.dense_steps} steps "
            f"{t_dense:.1f} s, random-LTD {ltd_steps} steps {t_ltd:.1f} s (ratio {t_ltd / t_dense:.3f}; executed "
            f"FLOPs ratio {res['flops_ltd'] / res['flops_dense']:.3f})"
        )
        print(
            f"per raw token vs dense: theoretical saving {100 * res['theoretical_saving_same_tokens']:.1f}%, "
            f"realised {100 * res['realised_saving_same_tokens']:.1f}% "
            f"({100 * res['realised_fraction']:.0f}% of the theoretical)"
        )
    step_dense.close(), step_ltd.close()
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
