"""Loss-curve regression (torchtitan's habit): each method trains a tiny model for 30 steps on text shipped with
leanlm, and its training-loss curve (metrics.csv `loss` at every step) must match the curve stored in
tests/assets/loss_baselines.json. A change to the loop, the optimizer, a schedule, a method's forward or its loss
terms moves the curve; float rounding does not (see RTOL).

The stored curves belong to the fixed setup below: wikitext-2's validation split (leanlm/texts/wikitext-2/valid.txt,
`data.inputs: [wikitext-2-valid]`) tokenized by a 512-token BPE trained on it, seq_len 64, batch 4, seed 0, one
thread, on the CPU. The JSON also stores a fingerprint of the tokenized data: a different `tokenizers` build that
trains another BPE fails with its own message rather than as a loss mismatch.

After a deliberate change to training (or to this setup), regenerate the curves and review the diff:

    LEANLM_WRITE_BASELINES=1 python -m pytest -q tests/test_loss_baseline.py -p no:cacheprovider
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from leanlm.training import config_from_dict, train

ASSETS = Path(__file__).with_name("assets") / "loss_baselines.json"
WRITE = os.environ.get("LEANLM_WRITE_BASELINES") == "1"

# Largest relative difference allowed at any step. Measured on this setup (2-core x86 CPU, one thread): repeated runs
# are bit-identical; perturbing every initial weight by a relative 1e-6 (~10 float32 ulps, more than a different
# BLAS's summation order adds per op) moves the curves by <= 2.5e-7 (relative); two threads: 0. Real changes move
# them by 1e-3 or more: lr x 1.01 by 0.9e-3..1.7e-3, warmup 5 -> 6 steps by 7e-3..9e-3, min_lr_ratio 0.1 -> 0 by
# 3e-3..7e-3, cosine -> wsd by 7e-3..4e-2; LTE without its efficiency loss (eta 1 -> 0) by 1.0e-3, without the
# separability loss by 8.5e-3, with L_eff = mean G instead of mean G^2 by 6.5e-4. 2e-4 lies 800x above the rounding
# measured here (room for the 1e-4 that other CPUs and BLAS builds have been seen to add) and 3x or more below
# every one of those changes. (Weight decay 0.1 -> 0 moves the curves by only 1e-4..3e-4: not reliably caught.)
RTOL = 2e-4

DATA = {"inputs": ["wikitext-2-valid"], "vocab_size": 512}
OPTIM = {"lr": 3.0e-3, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1}
RUN = {"steps": 30, "batch_size": 4, "seq_len": 64, "seed": 0, "log_every": 1, "eval_every": 0, "eval_batches": 1}
RUN.update(save_every=0, device="cpu", progress=False)
METHODS: dict[str, dict] = {
    "dense": {"model": {"preset": "tiny"}},
    "subllm": {"model": {"preset": "tiny", "n_layers": 3, "subllm": {"structure": "T(T)T"}}},
    "ltd": {"model": {"preset": "tiny", "n_layers": 4}, "ltd": {"r_min": 16, "q": 8}},
    "lte": {"model": {"preset": "tiny", "lte": {"expert_size": 32, "eta": 1.0}}},
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    """The shipped text, prepared once: its directory and a fingerprint of the token ids."""
    from leanlm.data import prepare

    out = tmp_path_factory.mktemp("baseline") / "data"
    prepare(DATA["inputs"], out, vocab_size=DATA["vocab_size"], progress=False)
    digest = hashlib.sha256()
    for split in ("train.bin", "val.bin"):
        digest.update((out / split).read_bytes())
    return out, {**DATA, "tokens_sha256": digest.hexdigest()}


@pytest.fixture(scope="module")
def baselines():
    """The stored curves; with LEANLM_WRITE_BASELINES=1 the curves of this run, written when the module ends."""
    if not WRITE:
        if not ASSETS.is_file():
            pytest.fail(f"{ASSETS} is missing: generate it with LEANLM_WRITE_BASELINES=1 (see this module's docstring)")
        yield json.loads(ASSETS.read_text())
        return
    new: dict = {
        "about": __doc__.splitlines()[0],
        "regenerate": "LEANLM_WRITE_BASELINES=1 (tests/test_loss_baseline.py)",
    }
    yield new
    if set(new.get("methods", {})) == set(METHODS):  # only a complete run replaces the file
        ASSETS.parent.mkdir(exist_ok=True)
        ASSETS.write_text(json.dumps(new, indent=1) + "\n")


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_curve_matches_the_baseline(method, data, baselines, tmp_path):
    data_dir, fingerprint = data
    setup = {"data": DATA, "optim": OPTIM, "run": RUN, **METHODS[method]}
    raw = {**setup, "data": {"dir": str(data_dir)}, "run": {**RUN, "out": str(tmp_path / "run")}}
    train(config_from_dict(raw))
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, RUN["steps"] + 1))
    curve = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0] - 0.5  # it learns at all
    if WRITE:
        baselines["data"] = fingerprint
        baselines.setdefault("methods", {})[method] = {"setup": setup, "loss": curve}
        return
    assert baselines["data"] == fingerprint, (
        "the tokenized text differs from the one the baselines were made on (another tokenizers build, or a change "
        "to data preparation): check why, then regenerate with LEANLM_WRITE_BASELINES=1"
    )
    stored = baselines["methods"][method]
    assert stored["setup"] == json.loads(json.dumps(setup)), "the setup changed: regenerate the baselines"
    want = stored["loss"]
    assert len(curve) == len(want)
    bad = [(step, got, ref) for step, (got, ref) in enumerate(zip(curve, want), 1) if abs(got - ref) > RTOL * abs(ref)]
    assert not bad, (
        f"{method}: the loss curve left the stored one (relative tolerance {RTOL}) at {len(bad)} of {len(want)} steps, "
        f"first at step {bad[0][0]}: {bad[0][1]!r} vs {bad[0][2]!r}. If training was changed on purpose, regenerate "
        "with LEANLM_WRITE_BASELINES=1 (see the module docstring)"
    )
