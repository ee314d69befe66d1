"""How close can a cheap router come to the training-free oracle, by expert size? (LTE, docs/results.md, tenth attempt)

No backbone training. A dense model is grouped into experts of --expert-size neurons; on --tokens training tokens the
oracle's choice per token and layer (the keep fraction of experts with the largest mean |SiLU(gate) * up|, as the
training-free baseline picks them) is recorded, and per layer a predictor is fitted to it with binary cross-entropy
(Deja Vu's recipe): --rank 0 = LTE's linear router (C -> n); r > 0 = a low-rank MLP (C -> r -> ReLU -> n). Each
layer's offsets are then shifted so that the predictor keeps the same fraction of experts on the training tokens,
and the model is evaluated on wikitext-2 test (the leanlm eval protocol) routing hard by the predictor, next to the
oracle at the same expert size and keep. Reported per predictor: perplexity, served sparsity, recall of the oracle's
experts on held-out tokens (and on the fit tokens), and the router's multiply-adds per token as a fraction of the FFN's.

    python benchmarks/lte_predictor_probe.py --model out/lte5/dense/final --data out/lte5/data \
        --expert-size 8 --ranks 0,128 --json

`--save DIR` writes the model with the fitted linear routers as a stage-1 LTE checkpoint, from which `leanlm train`
runs stage 2 (routers frozen): fitting to the oracle as a router initialisation that replaces stage 1.

`--refit-down` (with the linear router) then refits each FFN's down projection by least squares so that the FFN routed
hard by the fitted router reproduces the dense FFN's output on the fit tokens (`refit_down`; not in the paper: a
training-free compensation for the experts it drops, as pruning methods refit the weights they keep; docs/results.md,
sixteenth attempt). `--save` then writes the refitted down projections too.

`--grouping activations` groups the neurons by what they do on training text instead of by their gate rows (LTE's
balanced k-means, `weights`), as `model.lte.grouping: activations` does in `leanlm train`
(`leanlm.lte.activation_grouping`; docs/results.md, fourteenth attempt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.checkpoint import add_methods, load_model, save_checkpoint
from leanlm.config import LTEConfig
from leanlm.data import TokenDataset, load_tokenizer_ref
from leanlm.errors import LeanLMError
from leanlm.evaluate import evaluate
from leanlm.lte import calibration_rows, lte_layers, set_magnitude_routing


def collect(model, tokens: torch.Tensor, keep: float, seq: int, batch: int):
    """Per layer: the FFN inputs (N, C) and the oracle's choice (N, n) on `tokens`, the dense model unchanged."""
    layers = lte_layers(model)
    n_seq = tokens.numel() // seq
    rows = tokens[: n_seq * seq].view(n_seq, seq)  # (S, T)
    C = layers[0].down_proj.weight.shape[0]
    # filled in place, not collected in lists and concatenated: that doubled the peak and fragmented the heap
    # (131k tokens of SmolLM2 went past 24 GB); bf16 halves it again (131k tokens x 30 layers: 4.5 GB)
    xs = [torch.empty(n_seq * seq, C, dtype=torch.bfloat16) for _ in layers]
    ys = [torch.empty(n_seq * seq, m.n, dtype=torch.bool) for m in layers]
    at = [0]  # first row of the current batch

    def hook(i):
        def f(m, args):
            x = args[0].flatten(0, 1)  # (B*T, C)
            xs[i][at[0] : at[0] + x.shape[0]] = x
            ys[i][at[0] : at[0] + x.shape[0]] = m.magnitude_choice(m.hidden(x), keep)  # (B*T, n)

        return f

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    set_magnitude_routing(model, 1.0)  # every expert: the dense function
    try:
        with torch.no_grad():
            for s in range(0, n_seq, batch):
                model(rows[s : s + batch])
                at[0] += rows[s : s + batch].numel()
    finally:
        for h in handles:
            h.remove()
        set_magnitude_routing(model, None)
    return xs, ys


class Predictor(nn.Module):
    def __init__(self, C: int, n: int, rank: int):
        super().__init__()
        self.net = nn.Linear(C, n) if rank == 0 else nn.Sequential(nn.Linear(C, rank), nn.ReLU(), nn.Linear(rank, n))

    def forward(self, x):  # (N, C) -> (N, n) logits
        return self.net(x)


def macs(router: nn.Module) -> int:
    """Multiply-adds per token of a router (LTE's Linear or a Predictor)."""
    return sum(m.weight.numel() for m in router.modules() if isinstance(m, nn.Linear))


def fit(x: torch.Tensor, y: torch.Tensor, rank: int, steps: int, lr: float, seed: int) -> Predictor:
    torch.manual_seed(seed)
    p = Predictor(x.shape[1], y.shape[1], rank)
    opt = torch.optim.Adam(p.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (1024,), generator=g)
        loss = F.binary_cross_entropy_with_logits(p(x[idx].float()), y[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return p


@torch.no_grad()
def refit_down(m: nn.Module, x: torch.Tensor, ridge: float = 1e-3) -> None:
    """Refit the down projection of an LTE FFN m so that, routed hard by its router, it best reproduces its current
    dense output on the inputs x (N, C): W = argmin ||(on * h) W^T - h W0^T||^2 + ridge * mean(diag A) ||W||^2, with
    h (N, F) the neurons' activations, on (N, F) the router's choice broadcast to its experts and A = (on*h)^T (on*h).
    The ridge keeps the solve well posed (an expert the router never picks gets a zero block: it is never read)."""
    Fd = m.n * m.E
    A = torch.zeros(Fd, Fd, dtype=torch.float64)
    B = torch.zeros(Fd, m.down_proj.weight.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], 4096):
        xb = x[s : s + 4096].float()  # (b, C)
        h = m.hidden(xb)  # (b, n, E)
        on = m.logits(xb) > 0  # (b, n): the hard routing of inference and stage 2
        hm = (h * on.unsqueeze(-1)).flatten(-2).double()  # (b, F)
        y = m.down_proj(h.flatten(-2)).double()  # (b, C): the dense output, the target
        A += hm.t() @ hm
        B += hm.t() @ y
    A.diagonal().add_(ridge * A.diagonal().mean())
    m.down_proj.weight.copy_(torch.linalg.solve(A, B).t())  # (C, F)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="dense checkpoint (the oracle's source)")
    ap.add_argument("--data", required=True, help="prepared data dir (train.bin, val.bin) of that model's tokenizer")
    ap.add_argument("--test", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--expert-size", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument(
        "--grouping",
        default="weights",
        help="how neurons become experts: weights (LTE's k-means on gate rows) or activations (see above)",
    )
    ap.add_argument("--ranks", default="0,128", help="comma list; 0 = linear router")
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens to fit on")
    ap.add_argument("--steps", type=int, default=400, help="Adam steps of 1,024 tokens per layer")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq-len", type=int, default=512, help="evaluation windows' length")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--refit-down",
        action="store_true",
        help="after fitting the linear routers, refit the down projections by least squares (needs 0 in --ranks)",
    )
    ap.add_argument("--save", help="write the model with the fitted linear routers (needs 0 in --ranks) here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        run(args)
    except LeanLMError as e:
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> None:
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        ranks = [-1]
    if min(ranks) < 0:
        raise LeanLMError(f"--ranks: expected a comma list of integers >= 0 (got {args.ranks!r})")
    if args.save and 0 not in ranks:
        raise LeanLMError("--save: writes the fitted linear routers, so --ranks must include 0")
    if args.refit_down and 0 not in ranks:
        raise LeanLMError("--refit-down: refits under the fitted linear routers, so --ranks must include 0")
    if args.grouping not in ("weights", "activations"):
        raise LeanLMError(f"--grouping: must be weights or activations (got {args.grouping!r})")
    if not 0 < args.keep < 1:
        raise LeanLMError(f"--keep: must lie strictly between 0 and 1 (got {args.keep})")
    for flag, v in (
        ("--expert-size", args.expert_size),
        ("--steps", args.steps),
        ("--eval-windows", args.eval_windows),
    ):
        if v < 1:
            raise LeanLMError(f"{flag}: must be at least 1 (got {v})")
    lte_cfg = LTEConfig(expert_size=args.expert_size, grouping=args.grouping)
    try:  # the manifest gives the token dtype and checks both splits are there and whole
        train, val = TokenDataset(args.data, "train"), TokenDataset(args.data, "val")
    except LeanLMError as e:
        raise LeanLMError(f"--data: {e}") from None
    if not Path(args.test).is_file():
        raise LeanLMError(f"--test: no such file {args.test}")
    torch.set_num_threads(args.threads)

    dense, tok = load_model(args.model)
    lte_cfg.check(dense.cfg.ffn_dim)
    tok = tok or load_tokenizer_ref(args.data)  # a preset without weights: the data's own tokenizer
    try:
        train.check_vocab(dense.cfg.vocab_size)
    except LeanLMError as e:
        raise LeanLMError(f"--data: {e}") from None
    fit_tokens = torch.from_numpy(train.tokens[: args.tokens].astype(np.int64))
    held_tokens = torch.from_numpy(val.tokens[:4096].astype(np.int64))
    seq = min(256, dense.cfg.max_seq_len)
    if min(fit_tokens.numel(), held_tokens.numel()) <= seq:
        raise LeanLMError(f"--data: fewer than {seq + 1} tokens in its train or val split")
    t0 = time.time()
    rows = calibration_rows(train.tokens, dense.cfg.max_seq_len) if args.grouping == "activations" else None
    model = add_methods(dense, dense.cfg.replace(lte=lte_cfg), calibration=rows).float().eval()
    print(f"grouped by {args.grouping} in {time.time() - t0:.0f}s")
    del dense
    t0 = time.time()
    xs, ys = collect(model, fit_tokens, args.keep, seq, 8)
    hx, hy = collect(model, held_tokens, args.keep, seq, 8)
    print(f"collected {xs[0].shape[0]} + {hx[0].shape[0]} tokens x {len(xs)} layers in {time.time() - t0:.0f}s")

    layers = lte_layers(model)

    def ppl() -> tuple[float, float]:
        for m in layers:
            m.reset_stats()
        r = evaluate(model, tok, [args.test], seq_len=args.seq_len, max_windows=args.eval_windows, progress=False)
        return r["perplexity"], sum(m.sparsity() for m in layers) / len(layers)

    set_magnitude_routing(model, args.keep)
    oracle, oracle_sp = ppl()
    set_magnitude_routing(model, None)
    print(f"oracle: perplexity {oracle:.2f} at sparsity {oracle_sp:.3f}")
    C, ffn = layers[0].down_proj.weight.shape
    ffn_macs = 3 * C * ffn
    rows = [{"predictor": "oracle", "perplexity": oracle, "sparsity": oracle_sp}]
    saved = [
        (m.router, m.router.weight.data.clone(), m.router_offset.data.clone(), m.down_proj.weight.data.clone())
        for m in layers
    ]
    for rank in ranks:
        t0 = time.time()
        recalls, fit_recalls = [], []
        for i, m in enumerate(layers):
            p = fit(xs[i], ys[i], rank, args.steps, args.lr, seed=i)
            with torch.no_grad():
                # offset so that the predictor keeps `keep` of the experts on the fit tokens, as the oracle does
                thr = torch.quantile(p(xs[i][:8192].float()).flatten(), 1 - args.keep)
                for x, y, acc in ((hx[i], hy[i], recalls), (xs[i][:8192], ys[i][:8192], fit_recalls)):
                    on = p(x.float()) > thr
                    acc.append(float((on & y).sum() / y.sum()))
            if rank == 0:  # LTE's own router (weight, offset): the fitted bias moves into the offset
                m.router.weight.data = p.net.weight.data.clone()
                m.router_offset.data = p.net.bias.data - thr
                if args.refit_down:
                    refit_down(m, xs[i])
            else:
                m.router = p
                m.router_offset.data = torch.full_like(m.router_offset, -float(thr))
        fit_s = time.time() - t0
        perp, sp = ppl()
        if rank == 0 and args.save:  # a stage-1 LTE checkpoint with these routers: `leanlm train` can run stage 2
            model.lte_stage1_done.fill_(True)  # the routers are trained (fitted): stage 2 may start from them
            save_checkpoint(model, tok, args.save)
            model.lte_stage1_done.fill_(False)
            print(f"saved the model with the fitted linear routers to {args.save}")
        row = {
            "predictor": ("linear+refit" if args.refit_down else "linear") if rank == 0 else f"mlp-r{rank}",
            "perplexity": perp,
            "sparsity": sp,
            "recall": sum(recalls) / len(recalls),
            "recall_on_fit_tokens": sum(fit_recalls) / len(fit_recalls),
            "router_macs_vs_ffn": macs(layers[0].router) / ffn_macs,
            "fit_s": fit_s,
        }
        rows.append(row)
        print(
            f"{row['predictor']}: perplexity {perp:.2f} ({perp / oracle:.3f}x oracle) at sparsity {sp:.3f}, "
            f"recall {row['recall']:.3f} (fit tokens: {row['recall_on_fit_tokens']:.3f}), "
            f"router {row['router_macs_vs_ffn']:.3f} of FFN MACs, fit {fit_s:.0f}s"
        )
        for m, (r, w, off, w_d) in zip(layers, saved):
            m.router, m.router.weight.data, m.router_offset.data, m.down_proj.weight.data = r, w, off, w_d
    if args.json:
        print(
            json.dumps(
                {
                    "expert_size": args.expert_size,
                    "grouping": args.grouping,
                    "keep": args.keep,
                    "tokens": args.tokens,
                    "steps": args.steps,
                    "rows": rows,
                }
            )
        )


if __name__ == "__main__":
    main()
