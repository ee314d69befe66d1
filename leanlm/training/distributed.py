"""Multi-process training under torchrun: process group, DDP / FSDP2 wrapping, collective helpers, full state dicts.

`torchrun --nproc_per_node N -m leanlm train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` reads them and starts
the process group (NCCL on CUDA, gloo on CPU). A plain `python` process is world 1 and never touches
torch.distributed, so single-process training needs no process group.

Checkpoints hold full (unsharded) state keyed by parameter name, whatever the strategy: `full_model_state` and
`optimizer_state` gather them on rank 0 through torch.distributed.checkpoint.state_dict, which also strips DDP's
`module.` prefix, so a checkpoint written by N processes resumes in any number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from leanlm.errors import LeanLMError

STRATEGIES = ("auto", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Dist:
    """Where this process stands: rank, world size and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module started the process group, so `teardown` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise LeanLMError(f"environment variable {name}={v!r} is not an integer") from None


def setup(device: str = "auto") -> Dist:
    """Read torchrun's environment, pick the device and start the process group when there is more than one rank."""
    if device not in DEVICES:
        raise LeanLMError(f"run.device: must be one of {', '.join(DEVICES)} (got {device!r})")
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise LeanLMError("run.device: cuda requested but torch sees no CUDA device")
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=dev, owns_group=owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, world_size: int) -> str:
    """ "none" for one process (wrapping one process gains nothing), else ddp or fsdp ("auto" = ddp)."""
    if strategy not in STRATEGIES:
        raise LeanLMError(f"run.strategy: must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
    if world_size == 1:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def wrap(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """DDP, or FSDP2 sharding each block of `model.layers` and then the root (which holds embeddings and head)."""
    if strategy == "ddp":
        # the only buffers are RoPE tables computed identically on every rank: broadcasting them each step is waste
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)
    if strategy == "fsdp":
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module: DDP's `.module`; FSDP2 shards in place, so a sharded model is its own module."""
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps that are not the last."""
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def reshard(model: nn.Module) -> None:
    """After forward-only passes (validation), return FSDP2's root parameters to their shards. FSDP2 keeps the root
    gathered after a forward because a backward normally follows; until it reshards, `parameters()` yields the
    gathered tensors rather than the sharded ones the optimizer and state-dict functions know."""
    if isinstance(model, FSDPModule):
        model.reshard()


def all_mean(values: list[float], d: Dist) -> list[float]:
    """Mean of each value over ranks (float64, on the compute device, as NCCL needs)."""
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return (t / d.world_size).tolist()


def all_true(flag: bool, d: Dist) -> bool:
    """Whether `flag` holds on every rank."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter or gradient norm), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU on rank 0 (empty elsewhere). A collective under FSDP: call it on every rank."""
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, full and on CPU on rank 0 (empty elsewhere). A collective."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (from `optimizer_state`) on every rank; FSDP keeps its shard."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """`setup` on entry, `teardown` on exit (also on errors, so a failed run does not leave the group open)."""
    d = setup(device)
    try:
        yield d
    finally:
        teardown(d)
