"""FFN-block decode latency: dense SwiGLU vs LTE's sparse decode FFN vs plain torch indexing, at several sparsities.

    python benchmarks/lte_ffn_bench.py --preset smollm2-135m --sparsity 0.25,0.5,0.75 --repeats 7

One token (batch-1 decode) through every layer's FFN, with the weights in the decode layout `generate` uses on a CPU
(`model.decode_layout`, column-major). Variants, measured alternately in one process (order reversed every repeat):
dense = the baseline MLP; lte = LTEMLP.infer with the router's own cost included (router matmul + threshold) and
a random expert mask of the given sparsity per layer; index = the same selection through index_select copies of
row-major weights (the "vanilla PyTorch indexed matmul" of the paper's Fig. 8). Reports median ms per token for all
layers and the speed-up dense / variant per repeat (median [min, max]).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leanlm.config import LTEConfig, preset
from leanlm.lte import LTEMLP
from leanlm.model import MLP, decode_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--sparsity", default="0.25,0.5,0.75")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=50, help="decode steps per measurement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    L, C = cfg.n_layers, cfg.dim
    torch.manual_seed(0)
    dense = torch.nn.ModuleList(MLP(C, cfg.ffn_dim) for _ in range(L)).eval()
    lte = torch.nn.ModuleList(LTEMLP(C, cfg.ffn_dim, LTEConfig()) for _ in range(L)).eval()
    index = torch.nn.ModuleList(LTEMLP(C, cfg.ffn_dim, LTEConfig()) for _ in range(L)).eval()  # stays row-major
    for m in [*dense, *lte, *index]:
        for p in m.parameters():
            p.data.normal_(0, 0.02)
    xs = torch.randn(args.tokens, 1, 1, C)
    gen = torch.Generator().manual_seed(1)

    def run_dense() -> None:
        for x in xs:
            for m in dense:
                m(x)

    def run_sparse(mods, masks) -> None:
        for x, mask in zip(xs, masks):
            for m, on in zip(mods, mask):
                m.logits(x)  # the router's cost, as in a real forward (its decision is replaced by `on`)
                m.infer(x, on)

    print(
        f"{args.preset}: {L} layers, C={C}, F={cfg.ffn_dim}, {lte[0].n} experts of 32; "
        f"threads {torch.get_num_threads()}"
    )
    print("| sparsity | dense ms/token | LTE ms/token | index ms/token | dense/LTE | dense/index |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode(), decode_layout(dense), decode_layout(lte):
        for s in [float(v) for v in args.sparsity.split(",")]:
            masks = [[(torch.rand(1, 1, lte[0].n, generator=gen) >= s) for _ in range(L)] for _ in xs]
            fns = {
                "dense": run_dense,
                "lte": lambda m=masks: run_sparse(lte, m),
                "index": lambda m=masks: run_sparse(index, m),
            }
            for f in fns.values():
                f()
            t = {k: [] for k in fns}
            for r in range(args.repeats):
                for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                    t0 = time.perf_counter()
                    fns[k]()
                    t[k].append((time.perf_counter() - t0) * 1e3 / args.tokens)

            def ratio(k: str, t: dict = t) -> str:
                rs = [a / b for a, b in zip(t["dense"], t[k])]
                return f"{statistics.median(rs):.2f}× [{min(rs):.2f}, {max(rs):.2f}]"

            med = {k: statistics.median(v) for k, v in t.items()}
            print(
                f"| {s:.2f} | {med['dense']:.2f} | {med['lte']:.2f} | {med['index']:.2f} | {ratio('lte')} "
                f"| {ratio('index')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
