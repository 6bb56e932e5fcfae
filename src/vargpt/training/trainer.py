"""The Lightning Trainer of a stage, built from the typed trainer section (``cfg.trainer``), for every app.

The VARGPT stages and the stage-0 recipes (vargpt.training.app) get the same Trainer: strategy, precision,
validation cadence and the safe checkpoint reader come from the trainer section; the stage only adds its
length (optimizer steps) and its global batch, from which gradient accumulation follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from vargpt.training.checkpointing import SafeCheckpointIO
from vargpt.training.optim import accumulation_steps
from vargpt.training.parallel import build_strategy


def build_trainer(
    t: DictConfig, root_dir: str | Path, max_steps: int, callbacks: list[pl.Callback], logger: Any
) -> pl.Trainer:
    """The Lightning Trainer of the trainer section ``t`` for a stage of ``max_steps`` optimizer steps, writing
    under ``root_dir`` (the run folder).

    Gradient accumulation is set afterwards by ``set_accumulation``: it needs the world size, which the
    Trainer resolves from devices and num_nodes.
    """
    validating = bool(t.val_every_n_steps)
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy.value, t.find_unused_parameters, t.fsdp.save_distributed_checkpoint),
        precision=t.precision,
        max_steps=max_steps,
        # Budgets are in samples (steps); the data module's "epochs" are only virtual stream lengths.
        max_epochs=-1,
        check_val_every_n_epoch=None if validating else 1,
        limit_val_batches=t.limit_val_batches if validating else 0,
        num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=str(root_dir),
        # Resume checkpoints are read like init_from's: weights_only, whatever the environment says.
        plugins=[SafeCheckpointIO()],
    )


def set_accumulation(trainer: pl.Trainer, t: DictConfig, global_batch_size: int, micro_batch_size: int) -> int:
    """Derive gradient accumulation from the stage's global batch, the micro batch and the world size; returns it."""
    accumulate = accumulation_steps(global_batch_size, micro_batch_size, trainer.world_size)
    trainer.accumulate_grad_batches = accumulate
    if t.val_every_n_steps:
        # Lightning counts validation intervals in micro batches.
        trainer.val_check_interval = t.val_every_n_steps * accumulate
    return accumulate
