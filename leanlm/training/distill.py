"""Knowledge distillation from a teacher model (the training config's optional `distill:` section).

The minimised objective becomes (1 - weight) * cross-entropy + weight * T^2 * KL(teacher || student) at temperature
T, plus the methods' own losses; the logged loss stays the cross-entropy, so runs remain comparable. Not in the LTE or
SUBLLM papers: a lever for fine-tuning on little text, where the hard labels overfit (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from leanlm.checkpoint import load_model
from leanlm.errors import LeanLMError
from leanlm.model import Transformer


@dataclass
class DistillConfig:
    """The `distill:` section: the teacher, e.g. the dense model an LTE or SUBLLM model is converted from."""

    teacher: str | None = None  # required: a preset with weights, checkpoint, HF dir or .gguf with the same vocab
    weight: float = 1.0  # 1: the teacher's distribution only; 0: cross-entropy only
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.teacher:
            raise LeanLMError("distill.teacher: required (a model to distil from: checkpoint, .gguf or preset)")
        if not 0 <= self.weight <= 1:
            raise LeanLMError(f"distill.weight: must be in [0, 1] (got {self.weight!r})")
        if not self.temperature > 0:
            raise LeanLMError(f"distill.temperature: must be > 0 (got {self.temperature!r})")


def distill_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) per token, averaged over tokens; T^2 keeps the gradient's scale independent of T."""
    s = F.log_softmax(logits.float().flatten(0, 1) / temperature, dim=-1)  # (B*T, V)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)  # (B*T, V)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def load_teacher(cfg: DistillConfig, vocab_size: int, seq_len: int, device: torch.device) -> Transformer:
    """The frozen teacher, one copy per process, forward only; LeanLMError naming distill.teacher if it does not fit."""
    teacher, _ = load_model(cfg.teacher, dtype="float32")
    where = f"distill.teacher={cfg.teacher}"
    if teacher.cfg.vocab_size != vocab_size:
        raise LeanLMError(f"{where}: vocab size {teacher.cfg.vocab_size} differs from the model's {vocab_size}")
    if teacher.cfg.max_seq_len < seq_len:
        raise LeanLMError(f"{where}: its context of {teacher.cfg.max_seq_len} is shorter than run.seq_len={seq_len}")
    return teacher.to(device).eval().requires_grad_(False)
