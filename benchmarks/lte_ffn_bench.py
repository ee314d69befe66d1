"""FFN-block decode latency: dense SwiGLU vs LTE's sparse decode FFN (PyTorch and fused C++) vs plain torch indexing.

    python benchmarks/lte_ffn_bench.py --preset smollm2-135m --sparsity 0.0,0.25,0.5,0.75 --repeats 7 [--expert-size 8]

One token (batch-1 decode) through every layer's FFN, with the weights in the decode layout `generate` uses on a CPU
(`model.decode_layout`, column-major). The routers are random, with per-expert offsets set so that each expert is
off for the given fraction of the tokens (so the selection varies per token, as a trained router's does). Variants,
measured alternately in one process (order reversed every repeat), every LTE one routing with its router:

- PyTorch, FFN only: dense = the baseline MLP; torch = LTEMLP's PyTorch decode (two embedding_bags); index = the
  same selection through index_select copies of row-major weights (the "vanilla PyTorch indexed matmul" of the
  paper's Fig. 8);
- C++ kernels (`--kernel cpp`), the whole FFN half of a block, RMSNorm and residual included, as `generate` runs it:
  dense-cpp = `mlp_decode`; cpp = `lte_decode`.

Reports median ms per token for all layers and the speed-ups dense / torch, dense / index and dense-cpp / cpp per
repeat (median [min, max]): each sparse path against the dense path of its own kind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from leanlm.config import LTEConfig, preset
from leanlm.errors import LeanLMError
from leanlm.kernels import cpp_kernels
from leanlm.lte import LTEMLP
from leanlm.model import MLP, decode_layout

KINDS = ("torch", "cpp", "index")  # index: row-major weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--sparsity", default="0.25,0.5,0.75")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=50, help="decode steps per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--expert-size", type=int, default=32, help="model.lte.expert_size")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = preset(args.preset)
        lte_cfg = LTEConfig(expert_size=args.expert_size)
        lte_cfg.check(cfg.ffn_dim)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    L, C = cfg.n_layers, cfg.dim
    torch.manual_seed(0)
    dense = torch.nn.ModuleList(MLP(C, cfg.ffn_dim) for _ in range(L)).eval()
    lte = {k: torch.nn.ModuleList(LTEMLP(C, cfg.ffn_dim, lte_cfg) for _ in range(L)).eval() for k in KINDS}
    for m in [*dense, *lte["torch"]]:
        for p in m.parameters():
            p.data.normal_(0, 0.02)
    for k in ("cpp", "index"):  # the same weights and routers in every LTE variant
        lte[k].load_state_dict(lte["torch"].state_dict())
    xs = torch.randn(args.tokens, 1, 1, C)
    n = lte["torch"][0].n

    def run_dense() -> None:
        for x in xs:
            for m in dense:
                m(x)

    def run_lte(mods) -> None:
        for x in xs:
            for m in mods:
                m(x)

    def run_index(mods) -> None:
        for x in xs:
            for m in mods:
                m.infer(x, m.logits(x) > 0)

    norm_w = torch.ones(C)  # the block's RMSNorm, fused into both C++ variants

    def run_dense_cpp(args) -> None:
        for x in xs:
            for a in args:
                cpp_kernels().mlp_decode(x, norm_w, cfg.norm_eps, *a)

    def run_lte_cpp(mods) -> None:
        for x in xs:
            for m in mods:
                m._decode_fused(x, norm_w, cfg.norm_eps)

    print(
        f"{args.preset}: {L} layers, C={C}, F={cfg.ffn_dim}, {n} experts of {args.expert_size}; "
        f"threads {torch.get_num_threads()}"
    )
    print(
        "| sparsity | measured | dense ms/token | torch ms/token | index ms/token | dense-cpp ms/token | cpp ms/token "
        "| dense/torch | dense/index | dense-cpp/cpp |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with (
        torch.inference_mode(),
        decode_layout(dense),
        decode_layout(lte["torch"]),
        decode_layout(lte["cpp"], kernel="cpp"),
    ):
        dense_args = [(m.gate_up_proj.weight.t(), m.down_proj.weight.t()) for m in dense]  # (C, 2F), (F, C)
        for s in [float(v) for v in args.sparsity.split(",")]:
            for i in range(L):  # offsets: expert e is off for a fraction s of the tokens
                logits = xs.view(-1, C) @ lte["torch"][i].router.weight.t()  # (tokens, n)
                off = -torch.quantile(logits, s, dim=0) if s > 0 else torch.full((n,), 1e3)
                for k in lte:
                    lte[k][i].router_offset.copy_(off)
            for mods in lte.values():
                for m in mods:
                    m.reset_stats()
            fns = {
                "dense": run_dense,
                "torch": lambda: run_lte(lte["torch"]),
                "index": lambda: run_index(lte["index"]),
                "dense-cpp": lambda: run_dense_cpp(dense_args),
                "cpp": lambda: run_lte_cpp(lte["cpp"]),
            }
            for f in fns.values():
                f()
            measured = sum(m.sparsity() for m in lte["cpp"]) / L
            t = {k: [] for k in fns}
            for r in range(args.repeats):
                for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                    t0 = time.perf_counter()
                    fns[k]()
                    t[k].append((time.perf_counter() - t0) * 1e3 / args.tokens)

            def ratio(base: str, k: str, t: dict = t) -> str:
                rs = [a / b for a, b in zip(t[base], t[k])]
                return f"{statistics.median(rs):.2f}× [{min(rs):.2f}, {max(rs):.2f}]"

            med = {k: statistics.median(v) for k, v in t.items()}
            print(
                f"| {s:.2f} | {measured:.3f} | {med['dense']:.2f} | {med['torch']:.2f} | {med['index']:.2f} "
                f"| {med['dense-cpp']:.2f} | {med['cpp']:.2f} | {ratio('dense', 'torch')} | {ratio('dense', 'index')} "
                f"| {ratio('dense-cpp', 'cpp')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
