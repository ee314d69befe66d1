"""FFN-block decode latency: dense SwiGLU vs LTE's sparse decode FFN (PyTorch and fused C++) vs plain torch indexing.

    python benchmarks/lte_ffn_bench.py --preset smollm2-135m --sparsity 0.0,0.25,0.5,0.75 --repeats 7 [--expert-size 8]

One token (batch-1 decode) through every layer's FFN of a model built from the preset (random weights), with the
weights in the decode layout `generate` uses on a CPU (`leanlm.kernels.decode_layout`, column-major). The routers are
random, with per-expert offsets set so that each expert is off for the given fraction of the tokens (so the
selection varies per token, as a trained router's does). The tokens are random hidden states at unit RMS, so the
block's RMSNorm (weight 1) leaves them as they are and every variant routes them alike. Variants, measured
alternately in one process (order reversed every repeat), every LTE one routing with its router:

- PyTorch, FFN only (each block's `mlp`): dense = the baseline MLP; torch = LTE's FFN (LTEMLP) in its decode layout
  (two embedding_bags); index = the same selection through index_select copies of row-major weights (the "vanilla
  PyTorch indexed matmul" of the paper's Fig. 8; `LTEMLP.infer` outside the decode layout);
- C++ kernels (`--kernels torch,cpp`, the default), the whole FFN half of a block, RMSNorm and residual included, as
  `generate --kernel cpp` runs it (`MLP.decode_step` inside `decode_layout(model, "cpp")`): dense-cpp = the dense
  model's fused `mlp_decode`; cpp = LTE's fused `lte_decode`. `--kernels torch` leaves them out (no C++ build).

Reports median ms per token for all layers and the speed-ups dense / torch, dense / index and dense-cpp / cpp per
repeat (median [min, max]): each sparse path against the dense path of its own kind. `--json` adds one JSON object
on the last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.kernels import cpp_kernels, decode_layout
from leanlm.measure import reports, reset_stats, summarize
from leanlm.methods import build_model
from leanlm.methods.lte import LTEConfig
from leanlm.model import Transformer

LTE_KINDS = ("torch", "cpp", "index")  # index: row-major weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--sparsity", default="0.25,0.5,0.75")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=50, help="decode steps per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--expert-size", type=int, default=32, help="model.lte.expert_size")
    ap.add_argument("--kernels", default="torch,cpp", help="torch,cpp (default) or torch: leave out the C++ variants")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = args.kernels.split(",")
    if "torch" not in kernels or not set(kernels) <= {"torch", "cpp"}:
        sys.exit(f"error: --kernels must be torch,cpp or torch (got {args.kernels!r})")
    cpp = "cpp" in kernels
    try:
        sparsities = [float(v) for v in args.sparsity.split(",")]
    except ValueError:
        sys.exit(f"error: --sparsity must be comma-separated fractions (got {args.sparsity!r})")
    if not all(0 <= s < 1 for s in sparsities) or args.repeats < 1 or args.tokens < 1:
        sys.exit("error: --sparsity values must lie in [0, 1); --repeats and --tokens must be at least 1")
    try:
        cfg = preset(args.preset)
        lte_cfg = cfg.replace(methods={"lte": LTEConfig(expert_size=args.expert_size)})  # checks the expert size
        if cpp:
            cpp_kernels()  # build (or load) the C++ kernels first: a failure is one error
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    L, C = cfg.n_layers, cfg.dim
    dense = Transformer(cfg).init_weights(seed=0).eval()
    first = build_model(lte_cfg).init_weights(seed=0).eval()
    # copies: every LTE variant gets the same weights and routers
    lte = {k: first if k == "torch" else copy.deepcopy(first) for k in LTE_KINDS if cpp or k != "cpp"}
    xs = torch.randn(args.tokens, 1, 1, C, generator=torch.Generator().manual_seed(0))
    xs = F.rms_norm(xs, (C,))  # unit RMS: the blocks' RMSNorm (weight 1, eps aside) is the identity on them
    mlps = {k: [b.mlp for b in m.layers] for k, m in lte.items()}
    n = mlps["torch"][0].n

    def ffns(mods: list) -> Callable[[], None]:
        def run() -> None:
            for x in xs:
                for m in mods:
                    m(x)

        return run

    def run_index() -> None:
        for x in xs:
            for m in mlps["index"]:
                m.infer(x, m.logits(x) > 0)

    def halves(model: Transformer) -> Callable[[], None]:
        """x -> x + FFN(norm(x)) of every block, as the fused decode step runs it."""
        ops = cpp_kernels()
        steps = [b.mlp.decode_step(b.post_attention_layernorm, ops) for b in model.layers]

        def run() -> None:
            for x in xs:
                for step in steps:
                    step(x)

        return run

    print(
        f"{args.preset}: {L} layers, C={C}, F={cfg.ffn_dim}, {n} experts of {args.expert_size}; "
        f"threads {torch.get_num_threads()}"
    )
    cols = ["dense", "torch", "index", *(["dense-cpp", "cpp"] if cpp else [])]
    pairs = [("dense", "torch"), ("dense", "index"), *([("dense-cpp", "cpp")] if cpp else [])]
    head = " | ".join(f"{c} ms/token" for c in cols) + " | " + " | ".join(f"{a}/{b}" for a, b in pairs)
    print(f"| sparsity | measured | {head} |")
    print("|---" * (2 + len(cols) + len(pairs)) + "|")
    rows = []
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        # the dense model's FFNs are plain PyTorch in either layout; with "cpp" its decode steps are fused
        stack.enter_context(decode_layout(dense, "cpp" if cpp else "torch"))
        stack.enter_context(decode_layout(lte["torch"], "torch"))
        if cpp:
            stack.enter_context(decode_layout(lte["cpp"], "cpp"))
        fns = {"dense": ffns([b.mlp for b in dense.layers]), "torch": ffns(mlps["torch"]), "index": run_index}
        if cpp:
            fns |= {"dense-cpp": halves(dense), "cpp": halves(lte["cpp"])}
        for s in sparsities:
            for i in range(L):  # offsets: expert e is off for a fraction s of the tokens
                router = mlps["torch"][i].router
                logits = xs.view(-1, C) @ router.weight.t()  # (tokens, n)
                off = -torch.quantile(logits, s, dim=0) if s > 0 else torch.full((n,), 1e3)
                for mods in mlps.values():
                    mods[i].router_offset.copy_(off)
            for m in lte.values():
                reset_stats(m)
            for f in fns.values():
                f()
            measured = reports(lte["cpp" if cpp else "torch"])["lte"]["ffn_sparsity"]
            t = {k: [] for k in fns}
            for r in range(args.repeats):
                for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                    t0 = time.perf_counter()
                    fns[k]()
                    t[k].append((time.perf_counter() - t0) * 1e3 / args.tokens)

            speedups = {f"{a}/{b}": summarize([x / y for x, y in zip(t[a], t[b])]) for a, b in pairs}
            med = {k: statistics.median(v) for k, v in t.items()}
            rows.append({"sparsity": s, "measured": measured, "ms_per_token": med, "speedup": speedups})
            cells = [f"{med[c]:.2f}" for c in cols] + [
                f"{v['median']:.2f}× [{v['min']:.2f}, {v['max']:.2f}]" for v in speedups.values()
            ]
            print(f"| {s:.2f} | {measured:.3f} | {' | '.join(cells)} |", flush=True)
    if args.json:
        info = {"preset": args.preset, "layers": L, "experts": n, "expert_size": args.expert_size}
        print(json.dumps({"ok": True, **info, "threads": torch.get_num_threads(), "tokens": args.tokens, "rows": rows}))


if __name__ == "__main__":
    main()
