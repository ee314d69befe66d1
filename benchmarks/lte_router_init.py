"""How good are LTE routers before any training? On SmolLM2-135M (no fine-tuning), the hard-routed loss on a fixed
held-out batch (2 x 512 tokens of the prepared val split) for: all experts on; the per-token top-|h| oracle keeping
50% / 60% of the experts; centroid routers (MoEfication-style) and ridge-regression routers (fitted to predict each
expert's standardised mean |h| from the FFN input on 2,048 training tokens), each with per-expert offsets set to
keep 50% on those tokens. docs/design.md (LTE, router init) quotes it.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/lte_router_init.py
"""

import json

import numpy as np
import torch
import torch.nn.functional as F

from leanlm.checkpoint import add_methods, load_model
from leanlm.config import LTEConfig
from leanlm.lte import lte_layers, set_magnitude_routing

torch.set_num_threads(1)
d = "out/lte2/data"  # prepared by benchmarks/lte_sweep.py
val = torch.from_numpy(np.array(np.memmap(f"{d}/val.bin", dtype=np.uint16, mode="r")[: 2 * 512 + 1]).astype(np.int64))
vx, vy = val[:-1].view(2, 512), val[1:].view(2, 512)
tr = np.memmap(f"{d}/train.bin", dtype=np.uint16, mode="r")
cx = torch.from_numpy(np.array(tr[:2048]).astype(np.int64)).view(4, 512)
base, _ = load_model("smollm2-135m")
m = add_methods(base.float(), base.cfg.replace(lte=LTEConfig(router_init="centroid", router_init_std=1.0))).eval()
L = lte_layers(m)


@torch.no_grad()
def ev(tag):
    m.lte_reset_stats()
    loss = F.cross_entropy(m(vx).flatten(0, 1), vy.flatten()).item()
    print(json.dumps({"tag": tag, "loss": round(loss, 4), "sp": round(m.lte_report()["ffn_sparsity"], 3)}), flush=True)


set_magnitude_routing(m, None)
with torch.no_grad():
    for mm in L:
        mm.router_offset.fill_(100.0)
ev("dense")
for keep in (0.5, 0.6):
    set_magnitude_routing(m, keep)
    ev(f"oracle keep {keep}")
set_magnitude_routing(m, None)
# centroid, offset per expert set to the quantile for ~50%
xs = {}
hooks = [mm.register_forward_pre_hook(lambda mod, a: xs.__setitem__(mod, a[0].detach())) for mm in L]
with torch.no_grad():
    m(cx)
for h in hooks:
    h.remove()
W0 = {mm: mm.router.weight.detach().clone() for mm in L}
for keep in (0.5,):
    with torch.no_grad():
        for mm in L:
            mm.router.weight.copy_(W0[mm])
            lg = mm.router(xs[mm]).flatten(0, 1)
            mm.router_offset.copy_(-lg.quantile(1 - keep, dim=0))
    ev(f"centroid quantile keep {keep}")
# ridge-distilled router: predict mean|h| per expert
for lam in (1.0,):
    with torch.no_grad():
        for mm in L:
            x = xs[mm].flatten(0, 1)
            t = mm.hidden(x).abs().mean(-1)  # (N, n)
            t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True)  # per-token standardised
            xa = torch.cat([x, torch.ones(len(x), 1)], 1)
            Wb = torch.linalg.solve(xa.T @ xa + lam * torch.eye(xa.shape[1]), xa.T @ t)
            mm.router.weight.copy_(Wb[:-1].T)
            mm.router_offset.copy_(Wb[-1])
            lg = mm.router(x) + mm.router_offset
            mm.router_offset.sub_(lg.quantile(0.5, dim=0))
    ev(f"ridge lam {lam} keep 0.5")
