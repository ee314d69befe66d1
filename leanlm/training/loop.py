"""The training loop: `train(cfg)` trains, fine-tunes or resumes a model as a TrainConfig says, alone or under torchrun.

    leanlm train --config configs/tiny-cpu.yaml --set run.steps=100 --set optim.lr=1e-3
    torchrun --nproc_per_node 2 -m leanlm train --config configs/tiny-cpu.yaml --set run.strategy=fsdp

Outputs in run.out: `step-XXXXXXXX/` checkpoints (leanlm.training.state), the last `run.keep_last` of them kept;
`final/` (weights + config + tokenizer, for `leanlm eval/generate/bench --model`); `metrics.csv`, `tensorboard/`
when tensorboard is installed, `loss.png` when matplotlib is (leanlm.training.metrics); `config.yaml`.

Methods plug in through their protocol (leanlm/methods/base.py): the model's methods and the training methods of
the config (e.g. random-LTD) get `set_step` before each step, add `aux_loss` to the objective, report
`train_metrics` at log steps, and `calibrate` on training windows before each validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm import tqdm

import leanlm.training.distributed as distributed
import leanlm.training.state as state
from leanlm.checkpoint import load_model, save_checkpoint
from leanlm.config import model_config
from leanlm.data import CALIBRATION_LEN, BatchIterator, TokenDataset, calibration_windows, prepare, spread_batches
from leanlm.errors import LeanLMError
from leanlm.methods import REGISTRY, add_methods, build_model, calibrate_methods, check_compatible, install
from leanlm.methods.base import NeedsCalibration
from leanlm.model import ModelConfig, Transformer, on_meta
from leanlm.tokenizer import Tokenizer
from leanlm.training.config import TrainConfig
from leanlm.training.distill import distill_loss, load_teacher
from leanlm.training.metrics import MetricsLog, plot_losses, validation_loss
from leanlm.training.optim import LayerTokens, build_optimizer, schedule_lr, schedule_lr_layer_tokens

CALIBRATION_WINDOWS = 64  # windows of training text a conversion may calibrate on: 32k tokens


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) as `cfg` says; returns a summary. Runs under torchrun as well as alone."""
    run, out = cfg.run, Path(cfg.run.out)
    with contextlib.ExitStack() as stack:
        # ---- setup: processes, output directory, seeds, the checkpoint to resume -------------------------------------
        d = stack.enter_context(distributed.session(run.device))
        strategy = distributed.resolve_strategy(run.strategy, d.world_size)
        if run.batch_size % d.world_size:
            raise LeanLMError(f"run.batch_size={run.batch_size} is not divisible by the {d.world_size} processes")
        local_batch = run.batch_size // d.world_size
        note = functools.partial(_note, d)
        resumed = _start(out, run, d, note)

        # ---- model, training methods, teacher: checked before any data is prepared ----------------------------------
        model, init_tok, target = _load(cfg, resumed, note)
        if run.seq_len > target.max_seq_len:
            raise LeanLMError(f"run.seq_len={run.seq_len} exceeds the model's max_seq_len={target.max_seq_len}")
        tokens_per_step = run.batch_size * run.seq_len * run.grad_accum
        budget = run.layer_token_budget
        dense_steps = -(-budget // tokens_per_step) if budget is not None else run.steps  # ceil
        methods = [REGISTRY[name](section) for name, section in cfg.train_methods.items()]
        check_compatible(target, methods)
        for m in [*(REGISTRY[name](section) for name, section in target.methods.items()), *methods]:
            m.check_training()
        for m in methods:
            m.setup_run(target, run.seq_len, dense_steps)
        model = _convert(model, target, run, note)  # unless it calibrates on the training text: then after the data
        teacher = load_teacher(cfg.distill, target.vocab_size, run.seq_len, d.device) if cfg.distill else None

        # ---- data ----------------------------------------------------------------------------------------------------
        train_data, val_data, tokenizer = _data(cfg, target, init_tok, d, note)
        model = _convert(model, target, run, note, train_data)
        install(model, methods)
        # LayerTokens: the tokens each block sees under a training method's router (random-LTD), else every token
        router = next((r for m in methods if (r := m.token_router()) is not None), None)
        layer_tokens = LayerTokens(model.cfg.n_layers, run.seq_len, run.batch_size * run.grad_accum, router)
        if budget is not None:
            run = dataclasses.replace(run, steps=layer_tokens.steps_for(budget))
            note(f"note: run.layer_token_budget={budget}: {run.steps} optimizer steps")
        cfg = dataclasses.replace(cfg, model=model.cfg, run=run)
        batches = BatchIterator(
            train_data, local_batch, run.seq_len, seed=run.seed, rank=d.rank, world_size=d.world_size
        )
        calibration = spread_batches(train_data, local_batch, run.seq_len, run.eval_batches * d.world_size)

        # ---- optimizer: after wrapping, since FSDP replaces the parameters with shards -------------------------------
        raw = model.float().to(d.device)
        model = distributed.wrap(raw, strategy, d)
        optimizer = build_optimizer(raw, cfg.optim)
        params = [p for p in model.parameters() if p.requires_grad]
        step, tokens, last_loss = _resume(resumed, model, optimizer, batches, note)
        consumed = layer_tokens.total(step)  # LayerTokens so far: a function of the step
        # the LayerToken LR spans the budget (Megatron-DeepSpeed's decay tokens), or else the whole run
        lt_total = budget * raw.cfg.n_layers if budget is not None else layer_tokens.total(run.steps)
        if d.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = MetricsLog(out, step, d.is_main, [k for m in raw.methods for k in m.train_metrics(raw)] + _kd(teacher))
        stack.callback(log.close)
        autocast = functools.partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=run.bf16)
        bar = tqdm(
            total=run.steps, initial=step, unit="step", file=sys.stderr, disable=not (run.progress and d.is_main)
        )
        stack.callback(bar.close)
        teacher_flops = teacher.flops("prefill", run.seq_len) if teacher is not None else 0.0  # its forward

        def validate() -> float:
            """An explicit calibration step (e.g. SUBLLM's thresholds, saved with the model), then the val loss."""
            m, n = distributed.unwrap(model), run.eval_batches * d.world_size
            with autocast():
                for k, v in calibrate_methods(m, [x.to(d.device) for x in calibration]).items():
                    note(f"step {step}: calibrated {k} = {v}")
            return validation_loss(m, val_data, local_batch, run.seq_len, n, d.device, autocast)

        # ---- loop ----------------------------------------------------------------------------------------------------
        start_step, train_seconds, flops_sum, val_loss = step, 0.0, 0.0, None
        interval = {"tokens": 0, "seconds": 0.0, "losses": []}  # since the last metrics row
        model.train()
        while step < run.steps:
            t0 = time.perf_counter()
            for m in raw.methods:
                m.set_step(raw, step)
            flops = raw.flops("train", run.seq_len) + teacher_flops
            lr = _lr(cfg, step, consumed / raw.cfg.n_layers, lt_total / raw.cfg.n_layers)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, objective, kd = _accumulate(model, raw, batches, cfg, teacher, autocast, d)
            grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or math.inf))
            loss, objective, norm, kd = distributed.all_mean([loss, objective, grad_norm.item(), kd], d)
            _check_finite(step, objective, norm, out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            consumed += layer_tokens.at(step)
            step, tokens, last_loss, flops_sum = step + 1, tokens + tokens_per_step, loss, flops_sum + flops
            dt = time.perf_counter() - t0
            train_seconds += dt
            interval["seconds"] += dt
            interval["tokens"] += tokens_per_step
            interval["losses"].append(loss)

            is_last = step == run.steps
            validating = is_last or (run.eval_every and step % run.eval_every == 0)
            if is_last or validating or step % run.log_every == 0:
                # the methods' diagnostics of this training step, read before validation runs the model in eval mode
                row = {k: v for m in raw.methods for k, v in m.train_metrics(raw).items()}
                val_now = val_loss = validate() if validating else val_loss
                tps = interval["tokens"] / interval["seconds"]
                log.write(
                    {
                        **{"step": step, "tokens": tokens, "layer_tokens": consumed // raw.cfg.n_layers},
                        "loss": sum(interval["losses"]) / len(interval["losses"]),  # mean since the last row
                        **{"val_loss": val_now if validating else None, "lr": lr, "grad_norm": norm},
                        **{"tokens_per_s": tps, "flops_per_token": flops, **row},
                        **({"distill_kl": kd} if teacher is not None else {}),  # this step's KL to the teacher
                    }
                )
                interval = {"tokens": 0, "seconds": 0.0, "losses": []}
                val = f" val {val_loss:.3f}" if val_loss is not None else ""
                bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.2e} {tps:,.0f} tok/s{val}", refresh=False)
            bar.update(1)
            if run.save_every and (is_last or step % run.save_every == 0):
                _save_step(out, model, tokenizer, optimizer, batches, cfg, d, step, tokens, last_loss)
        bar.close()

        # ---- final save: weights + config + tokenizer for eval/generate/bench ----------------------------------------
        if val_loss is None:  # resumed at the last step: nothing was scored in this session
            val_loss = validate()
        if not _weights_finite(model, d):
            raise LeanLMError(f"step {step}: the weights are no longer finite; not saving {out / 'final'}")
        full = _model_for_saving(model, raw.cfg, d)  # the live config: what training set on it (calibration)
        session = step - start_step
        summary = {"out": str(out), "checkpoint": str(out / "final"), "steps": step, "tokens": tokens}
        summary |= {"loss": last_loss, "val_loss": val_loss, "train_seconds": train_seconds}
        summary["tokens_per_s"] = session * tokens_per_step / train_seconds if train_seconds else None
        # executed FLOPs per token, the mean over this session's steps (random-LTD changes them per step)
        summary["flops_per_token"] = flops_sum / session if session else raw.flops("train", run.seq_len)
        summary["layer_tokens"] = consumed // raw.cfg.n_layers
        # a DTensor's numel is that of the whole parameter
        summary |= {"params": sum(p.numel() for p in params), "world_size": d.world_size, "strategy": strategy}
        if d.is_main:
            trained = {k: summary[k] for k in ("steps", "tokens", "loss", "val_loss")}
            save_checkpoint(full, tokenizer, out / "final", extra={"trained": trained})
            plot_losses(out / "metrics.csv", out / "loss.png")
        distributed.barrier(d)
        return summary


# ---------------------------------------------------------------------------------------------------------------------
# the loop's parts


def _note(d: distributed.Dist, msg: str) -> None:
    if d.is_main:
        print(msg, file=sys.stderr)


def _kd(teacher: Transformer | None) -> list[str]:
    return ["distill_kl"] if teacher is not None else []


def _start(out: Path, run: Any, d: distributed.Dist, note: Any) -> dict | None:
    """Checks, the output directory, seeds; the newest complete checkpoint when resuming."""
    if not run.resume and state.checkpoint_dirs(out):
        raise LeanLMError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        state.remove_stale_temporaries(out)
    state.seed_everything(run.seed)
    found = state.latest_checkpoint(out, note) if run.resume else None
    if run.resume and found is None:
        note(f"note: no complete checkpoint in {out}; starting from step 0")
    if found is None:
        return None
    path, meta, weights, trainer = found
    if trainer["step"] > run.steps:
        raise LeanLMError(f"resume: {path} is at step {trainer['step']}, beyond run.steps={run.steps}")
    # a dict, so that the weights and the optimizer state are dropped as soon as they are loaded into place
    return {"path": path, "meta": meta, "weights": weights, "state": trainer}


def _load(cfg: TrainConfig, resumed: dict | None, note: Any) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """The model to start from (resumed weights, a pretrained init, or a fresh random model), its tokenizer, and the
    architecture to train: the model's own, or (run.init with method sections) one to convert it into."""
    run = cfg.run
    if resumed is not None:
        path = resumed["path"]
        saved = model_config(resumed["meta"]["model"], where=f"{path}/config.json: model")
        if cfg.model is not None and not run.init:
            _check_same_model(cfg.model, saved, path)
        model = build_model(saved)
        _load_weights(model, resumed.pop("weights"), str(path))
        return model, None, saved
    if not run.init:
        return build_model(cfg.model).init_weights(run.seed), None, cfg.model
    model, tok = load_model(run.init, dtype="float32", seed=run.seed)
    target = model.cfg
    if cfg.add_methods:
        target = model_config({**model.cfg.to_dict(), **cfg.add_methods})
    elif cfg.model is not None and cfg.model.backbone() == model.cfg.backbone():
        # a whole model section on the init's backbone, e.g. the config.yaml an LTE stage-1 run saved: its methods
        # apply as a methods-only section's would, so re-running a saved config repeats the run
        sections = {name: dataclasses.asdict(s) for name, s in cfg.model.methods.items()}
        target = model_config({**model.cfg.to_dict(), **sections})  # the methods in the registry's order
    if cfg.model is not None and cfg.model != target:
        note(f"note: run.init={run.init}: the model section is ignored, the architecture is the init model's")
    return model, tok, target


def _data(
    cfg: TrainConfig, target: ModelConfig, init_tok: Tokenizer | None, d: distributed.Dist, note: Any
) -> tuple[TokenDataset, TokenDataset, Tokenizer]:
    """Prepare the data on first use (rank 0), then every rank maps the same files."""
    run = cfg.run
    data_dir = Path(cfg.data.dir) if cfg.data.dir else Path(run.out) / "data"
    if cfg.data.inputs is not None:
        if d.is_main:
            prepare(
                cfg.data.inputs,
                data_dir,
                tokenizer=cfg.data.tokenizer or run.init,
                vocab_size=cfg.data.vocab_size or target.vocab_size,
                val_fraction=cfg.data.val_fraction,
                progress=run.progress,
            )
        distributed.barrier(d)
    train_data, val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    tokenizer = Tokenizer.load(data_dir)
    train_data.check_vocab(target.vocab_size)
    if init_tok is not None and init_tok.tok.get_vocab() != tokenizer.tok.get_vocab():
        note(f"warning: {data_dir} was tokenized differently from {run.init}'s tokenizer; prepare it with that one")
    if len(val_data) < run.seq_len + 1:
        raise LeanLMError(
            f"{data_dir}: {len(val_data)} validation tokens, fewer than seq_len + 1 = "
            f"{run.seq_len + 1}; raise data.val_fraction or lower run.seq_len"
        )
    return train_data, val_data, tokenizer


def _resume(resumed: dict | None, model: nn.Module, optimizer: Any, batches: BatchIterator, note: Any) -> tuple:
    """Optimizer, data position, RNGs and counters of a resumed run: (step, tokens, last loss)."""
    if resumed is None:
        return 0, 0, None
    path, s = resumed["path"], resumed.pop("state")
    distributed.load_optimizer_state(model, optimizer, s["optimizer"])
    batches.load_state_dict(s["data"])
    state.set_rng_state(s["rng"])
    note(f"resuming from {path} (step {s['step']}, {s['tokens']} tokens)")
    return s["step"], s["tokens"], s["loss"]


def _accumulate(
    model: nn.Module, raw: Transformer, batches: BatchIterator, cfg: TrainConfig, teacher: Any, autocast: Any, d: Any
) -> tuple[float, float, float]:
    """One optimizer step's forward and backward passes: (cross-entropy, the minimised objective, KL to the teacher),
    means over the micro-steps of this process. The objective adds the methods' auxiliary losses (and distillation)."""
    n = cfg.run.grad_accum
    sums = torch.zeros(3, device=d.device)  # on the device: one host sync per step, not per micro-step
    for micro in range(n):
        x, y = (t.to(d.device, non_blocking=True) for t in next(batches))
        with distributed.grad_sync(model, enabled=micro == n - 1), autocast():
            logits = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            total, kd = loss, loss.new_zeros(())
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)  # (B, T, V)
                kd = distill_loss(logits, teacher_logits, cfg.distill.temperature)
                total = (1 - cfg.distill.weight) * loss + cfg.distill.weight * kd
            for m in raw.methods:
                aux = m.aux_loss(raw)
                total = total if aux is None else total + aux
        (total / n).backward()
        sums += torch.stack([loss.detach(), total.detach(), kd.detach()])
    return tuple((sums / n).tolist())


def _convert(model: Transformer, target: ModelConfig, run: Any, note: Any, data: TokenDataset | None = None):
    """`model` converted into `target` (run.init with method sections). Before the data is prepared (`data` None),
    so that its errors come first, unless a method calibrates the conversion on text: then on the training split."""
    if target == model.cfg:
        return model
    rows = None
    if data is not None:
        rows = calibration_windows(data.tokens, CALIBRATION_WINDOWS, min(CALIBRATION_LEN, target.max_seq_len), run.seed)
    try:
        new = add_methods(model, target, seed=run.seed, calibration=rows)
    except NeedsCalibration:
        if data is not None:
            raise
        return model  # converted once the data is there
    note(f"note: run.init={run.init}: converted into {target.arch}")
    return new


def _lr(cfg: TrainConfig, step: int, consumed: float, total: float) -> float:
    """This step's learning rate: the schedule at the step, or (LayerToken LR) at the layer-averaged tokens consumed
    so far out of `total`, counted in dense steps."""
    if cfg.optim.lr_index == "layer_tokens":
        return schedule_lr_layer_tokens(
            consumed, total, cfg.run.batch_size * cfg.run.seq_len * cfg.run.grad_accum, cfg.optim
        )
    return schedule_lr(step, cfg.optim, cfg.run.steps)


def _check_finite(step: int, objective: float, norm: float, out: Path) -> None:
    """Stop before an update that would make the weights non-finite, naming the last checkpoint to go back to."""
    if not (math.isfinite(objective) and math.isfinite(norm)):
        what = f"loss is {objective}" if not math.isfinite(objective) else f"gradient norm is {norm}"
        last = state.checkpoint_dirs(out)
        raise LeanLMError(
            f"step {step + 1}: {what}; stopped without updating the weights (lower optim.lr?); "
            f"last checkpoint: {last[-1] if last else 'none'}"
        )


def _save_step(out: Path, model, tokenizer, optimizer, batches, cfg, d, step: int, tokens: int, loss) -> None:
    """A step checkpoint with everything an exact resume needs (a collective under FSDP: every rank calls it). Its
    model config is the configured one: what calibration sets is redone before every validation, and a resume
    compares configs."""
    if not _weights_finite(model, d):
        raise LeanLMError(f"step {step}: the weights are no longer finite; not saving a checkpoint")
    trainer_state = {
        "version": state.TRAINER_STATE_VERSION,
        "step": step,
        "tokens": tokens,
        "loss": loss,
        "optimizer": distributed.optimizer_state(model, optimizer),
        "data": batches.state_dict(),
        "rng": state.rng_state(),
        "world_size": d.world_size,
        "config": cfg.to_dict(),
    }
    full = _model_for_saving(model, cfg.model, d)
    if d.is_main:
        state.save_training_checkpoint(out / f"step-{step:08d}", full, tokenizer, trainer_state)
        state.prune(out, cfg.run.keep_last)
    distributed.barrier(d)


def _model_for_saving(model: nn.Module, model_cfg: ModelConfig, d: distributed.Dist) -> Transformer | None:
    """A CPU copy of the full model on rank 0 (None elsewhere): FSDP shards must be gathered (a collective). Built
    from the config alone, so training methods (random-LTD) are not part of it."""
    full_state = distributed.full_model_state(model)
    if not d.is_main:
        return None
    with on_meta():
        full = build_model(model_cfg)
    full.load_state_dict(full_state, assign=True)
    return full


def _weights_finite(model: nn.Module, d: distributed.Dist) -> bool:
    ok = all(bool(torch.isfinite(distributed.local_tensor(p)).all()) for p in model.parameters())
    return distributed.all_true(ok, d)


def _check_same_model(configured: ModelConfig, saved: ModelConfig, where: Path) -> None:
    a, b = configured.to_dict(), saved.to_dict()
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            raise LeanLMError(
                f"resume: {where} was trained with model.{k}={b.get(k)!r} but the config says {a.get(k)!r}"
            )


def _load_weights(model: nn.Module, weights: dict[str, Tensor], where: str) -> None:
    expected = set(model.state_dict())
    if model.cfg.tie_embeddings:
        expected.discard("lm_head.weight")  # checkpoints store a tied head once, as the embedding
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise LeanLMError(f"{where}: weights do not match the model ({what})")
    model.load_state_dict(weights, strict=False)


__all__ = ["train"]
