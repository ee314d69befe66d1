"""LTE training probe: stage 1 (+ stage 2) on SmolLM2-135M in one process, no checkpoints. Logs per step the soft
train loss, L_eff, L_sep, the hard sparsity of the step, and every --every steps the hard-routed loss and sparsity
on a fixed held-out batch (2 x 512 tokens of the prepared data's val split). Used to choose the router init, eps and
eta of docs/results.md (LTE); the data dir is the one benchmarks/lte_sweep.py prepares.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/lte_probe.py --bias 1.5 --rlr 100 --eta 16 --eps 0.1 --s1 30 --s2 10
    ... --dense        # the dense fine-tune with the same loop
    ... --detach       # router input detached: L_eff / L_sep train the routers only (not a config key)
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--eta", type=float, default=0.5)
ap.add_argument("--lam", type=float, default=0.5)
ap.add_argument("--init", default="random")
ap.add_argument("--std", type=float, default=0.02)
ap.add_argument("--bias", type=float, default=0.0)
ap.add_argument("--rlr", type=float, default=10.0)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--s1", type=int, default=20)
ap.add_argument("--s2", type=int, default=0)
ap.add_argument("--bs", type=int, default=2)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--clip", type=float, default=1.0)
ap.add_argument("--detach", action="store_true")
ap.add_argument("--dense", action="store_true")
ap.add_argument("--every", type=int, default=5)
ap.add_argument("--eps", type=float, default=0.01)
ap.add_argument("--data", default="out/lte2/data")
args = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
from leanlm.checkpoint import add_methods, load_model  # noqa: E402
from leanlm.config import LTEConfig  # noqa: E402
from leanlm.lte import lte_layers  # noqa: E402

d = args.data
train = np.memmap(f"{d}/train.bin", dtype=np.uint16, mode="r")
val = torch.from_numpy(np.array(np.memmap(f"{d}/val.bin", dtype=np.uint16, mode="r")[: 2 * 512 + 1]).astype(np.int64))
vx, vy = val[:-1].view(2, 512), val[1:].view(2, 512)
rng = np.random.default_rng(0)


def batch():
    s = rng.integers(0, len(train) - args.seq - 1, args.bs)
    a = torch.from_numpy(np.stack([train[i : i + args.seq + 1] for i in s]).astype(np.int64))
    return a[:, :-1], a[:, 1:]


model, _ = load_model("smollm2-135m")
model = model.float()
lte = None
if not args.dense:
    lte = LTEConfig(
        eta=args.eta,
        lambda_sep=args.lam,
        router_init=args.init,
        router_init_std=args.std,
        router_init_bias=args.bias,
        router_lr_scale=args.rlr,
        sep_eps=args.eps,
    )
    model = add_methods(model, model.cfg.replace(lte=lte))
    if args.detach:
        for m in lte_layers(model):
            orig = m.logits
            m.logits = (lambda o: lambda x: o(x.detach()))(orig)


@torch.no_grad()
def hard_val():
    model.eval()
    if lte:
        model.lte_reset_stats()
    lg = model(vx)
    loss = F.cross_entropy(lg.flatten(0, 1), vy.flatten()).item()
    sp = model.lte_report()["ffn_sparsity"] if lte else 0.0
    model.train()
    return loss, sp


def opt_for():
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(getattr(p, "lr_scale", 1.0), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr_scale": s} for s, ps in groups.items()], lr=args.lr, weight_decay=0.0)


def run(stage, steps):
    global model
    opt = opt_for()
    model.train()
    for step in range(steps):
        lr = args.lr * min(1, (step + 1) / 2) * (0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = batch()
        t0 = time.time()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        total = loss + (model.aux_loss() if lte and stage == 1 else 0.0)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {
            "st": stage,
            "step": step + 1,
            "loss": round(loss.item(), 3),
            "gn": round(gn.item(), 2),
            "dt": round(time.time() - t0, 1),
        }
        if lte:
            tm = model.train_metrics()
            rec.update(
                sp=round(tm["lte_sparsity"], 3),
                eff=tm["lte_eff_loss"] and round(tm["lte_eff_loss"], 3),
                sep=tm["lte_sep_loss"] and round(tm["lte_sep_loss"], 2),
            )
        if (step + 1) % args.every == 0 or step + 1 == steps:
            rec["hval"], rec["hsp"] = [round(v, 4) for v in hard_val()]
        print(json.dumps(rec), flush=True)


print(json.dumps(vars(args)))
l0, s0 = hard_val()
print(json.dumps({"step": 0, "hval": round(l0, 4), "hsp": round(s0, 3)}), flush=True)
run(1, args.s1)
if args.s2 and lte:
    cfg2 = model.cfg.replace(lte=lte.__class__(**{**lte.__dict__, "stage": 2}))
    model = add_methods(model, cfg2)
    run(2, args.s2)
