"""Optimizer parameter groups, the learning-rate schedule and the batch arithmetic of a stage.

Groups: only trainable parameters (the stage froze the rest), split by learning rate (``stage.lr_by_module``,
longest module prefix wins) and by weight decay. No decay on norms, biases, embeddings and position tables,
as VAR and the HF Trainer do (VARGPT-REFERENCE.md 5.3); the released recipe uses weight_decay 0 anyway, so
this only matters when a stage turns decay on.

Schedule: linear warmup over ``warmup_ratio`` of the stage's optimizer steps, then cosine (or linear) decay
to ``min_lr_ratio`` of the peak, the HF ``cosine`` schedule the release trains with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Parameters that are position/scale tables rather than weight matrices (VAR's and CLIP's names).
NO_DECAY_LEAF_NAMES = frozenset({"pos_start", "pos_1LC", "scale_mul_1H11", "class_embedding"})


def _no_decay(module: nn.Module, leaf: str, param: torch.Tensor) -> bool:
    if param.ndim < 2 or leaf.endswith("bias") or leaf in NO_DECAY_LEAF_NAMES:
        return True
    return isinstance(module, nn.Embedding) or "Norm" in type(module).__name__


def _module_lr(name: str, base_lr: float, lr_by_module: Mapping[str, float]) -> tuple[str, float]:
    best = ""
    for prefix in lr_by_module:
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return (best, float(lr_by_module[best])) if best else ("default", base_lr)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_by_module: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, named ``<prefix>/decay`` or ``<prefix>/no_decay``."""
    lr_by_module = dict(lr_by_module or {})
    groups: dict[str, dict[str, Any]] = {}
    for mod_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            prefix, group_lr = _module_lr(name, lr, lr_by_module)
            no_decay = _no_decay(module, leaf, param)
            key = f"{prefix}/{'no_decay' if no_decay else 'decay'}"
            group = groups.setdefault(
                key,
                {
                    "name": key,
                    "params": [],
                    "param_names": [],
                    "lr": group_lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                },
            )
            group["params"].append(param)
            group["param_names"].append(name)
    unused = set(lr_by_module) - {k.split("/")[0] for k in groups}
    if unused:
        raise ValueError(f"stage.lr_by_module: {sorted(unused)} match no trainable parameter")
    if not groups:
        raise ValueError("no trainable parameters: the stage froze everything")
    return list(groups.values())


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float
) -> LambdaLR:
    """Per-step LambdaLR; every group keeps its own peak learning rate."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule, min_lr_ratio))


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation that turns micro batches on every rank into the stage's global batch."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"stage.global_batch_size={global_batch_size} is not a multiple of micro_batch_size "
            f"({micro_batch_size}) x world size ({world_size}) = {per_step}; pick a global batch that is"
        )
    return global_batch_size // per_step


def optimizer_steps(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps of a stage's sample budget (the last step may be partly past the budget)."""
    return math.ceil(num_samples / global_batch_size)
