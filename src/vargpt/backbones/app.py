"""The recipe branch of ``src/train.py``: a stage with ``stage.recipe`` trains a backbone, not VARGPT.

Everything around the model is the VARGPT stages' own: the composed config, the Lightning Trainer of
``cfg.trainer``, MLflow tracking, ``last.ckpt`` + every-N checkpoints with SIGTERM handling and
``resume``, and the stage record the next stage reads. What differs is the LightningModule and the data
(vargpt.backbones.build), and the export: the recipe's product as one safetensors file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from vargpt.backbones.build import build_recipe, export_recipe
from vargpt.training import checkpointing as ckpt
from vargpt.training import tracking
from vargpt.training.lightning_module import build_trainer, set_accumulation
from vargpt.training.optim import optimizer_steps

log = logging.getLogger(__name__)


class RecipeExport(Callback):
    """At the end of a completed recipe stage: export its product and write the stage record."""

    def __init__(self, end: ckpt.StageCheckpoint, cfg: DictConfig, run_dir: Path) -> None:
        self.end, self.cfg, self.run_dir = end, cfg, run_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end.preempted_at is not None or not trainer.is_global_zero:
            return
        out = export_recipe(pl_module, self.cfg, self.run_dir / "export")
        record = ckpt.StageRecord(
            stage=self.cfg.stage.name,
            run_name=self.cfg.run_name,
            checkpoint=str(self.end.last),
            export_dir=str(out),
            mlflow_run_id=getattr(trainer.logger, "run_id", None),
            global_step=trainer.global_step,
            finished_at=ckpt.now(),
        )
        ckpt.write_stage_record(self.cfg.paths.log_dir, record)
        log.info("%s: exported %s", self.cfg.stage.name, out)


def train_recipe(
    cfg: DictConfig, tokenizer: Any, run_dir: Path, resume_from: str | None, logger: Any, overrides: list[str]
) -> dict[str, float]:
    """Fit one recipe stage; returns the final logged metrics."""
    max_steps = optimizer_steps(cfg.stage.num_samples, cfg.stage.global_batch_size)
    module, datamodule = build_recipe(cfg, tokenizer, max_steps, cfg.paths.log_dir)
    c = cfg.callbacks
    checkpoint = ckpt.StageCheckpoint(run_dir / "checkpoints", c.checkpoint.every_n_steps, c.checkpoint.keep_last)
    callbacks: list[Callback] = [checkpoint, RecipeExport(checkpoint, cfg, run_dir)]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if rank_zero_only.rank == 0:
        tracking.record_run(logger, cfg, overrides, run_dir, new_run=resume_from is None)
    trainer = build_trainer(cfg, max_steps, callbacks, logger)
    set_accumulation(trainer, cfg, datamodule.micro_batch_size)
    log.info(f"{cfg.run_name}: recipe {cfg.stage.recipe.kind}, {max_steps} optimizer steps")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # One full validation pass at the end on the fixed validation items: the figures the manifest records
    # (the trainer preset may skip validation during training).
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if rank_zero_only.rank == 0:
        summary = "\n".join(f"{k}: {v:.4g}" for k, v in sorted(metrics.items()))
        tracking.log_artifact_text(logger, summary + "\n", "summary.txt", run_dir)
        print(f"\n{cfg.stage.name} finished: {summary}\nexport: {run_dir / 'export'}")
    return metrics
