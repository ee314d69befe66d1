"""Training: typed configs (config.py), one readable loop (loop.py), checkpoints with exact resume (state.py),
metrics and plots (metrics.py), distillation (distill.py), the optimizer and schedules (optim.py), and torchrun's
DDP / FSDP2 (distributed.py).

    from leanlm.training import load_config, train
    summary = train(load_config("configs/tiny-cpu.yaml", ["run.steps=50"]))
"""

from leanlm.training.config import TrainConfig, config_from_dict, load_config, section_keys
from leanlm.training.loop import train

__all__ = ["TrainConfig", "config_from_dict", "load_config", "section_keys", "train"]
