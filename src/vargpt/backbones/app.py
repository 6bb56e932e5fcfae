"""The recipe branch of ``src/train.py``: a stage with ``stage.recipe`` trains a backbone, not VARGPT.

Everything around the model is the VARGPT stages' own: the composed config, the Lightning Trainer of
``cfg.trainer``, MLflow tracking, ``last.ckpt`` + every-N checkpoints with SIGTERM handling and
``resume`` (a complete run's rerun finishes what an interrupted end left out), and the stage record the next
stage reads. What differs is the LightningModule and the data
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
    """At the end of a completed recipe stage: write the final ``last.ckpt``, export the product, then write the
    stage record (in that order, so the record only ever names a complete run)."""

    def __init__(self, end: ckpt.StageCheckpoint, cfg: DictConfig, run_dir: Path) -> None:
        self.end, self.cfg, self.run_dir = end, cfg, run_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end.preempted_at is not None:
            return
        self.end.save_last_now(trainer)
        if trainer.is_global_zero:
            self.finish(pl_module, self.end.last, trainer.global_step, getattr(trainer.logger, "run_id", None))

    def finish(
        self, module: pl.LightningModule, checkpoint: Path, step: int, run_id: str | None, export: bool = True
    ) -> None:
        """Export the product (``export=False``: a finished run's export is there already) and write the stage
        record (rank 0)."""
        out = self.run_dir / "export"
        if export:
            export_recipe(module, self.cfg, out)
            log.info("%s: exported %s", self.cfg.stage.name, out)
        ckpt.record_finished_stage(self.cfg, checkpoint, out, run_id, step, self.run_dir)


def train_recipe(
    cfg: DictConfig,
    tokenizer: Any,
    run_dir: Path,
    resume: ckpt.ResumePoint | None,
    logger: Any,
    overrides: list[str],
) -> dict[str, float]:
    """Fit one recipe stage; returns the final logged metrics.

    Raises ``checkpointing.PreemptedError`` when SIGTERM stopped it. A rerun of a complete run (its checkpoint at
    the last step) trains nothing: it validates the checkpoint and writes what an interrupted end left out.
    """
    max_steps = optimizer_steps(cfg.stage.num_samples, cfg.stage.global_batch_size)
    module, datamodule = build_recipe(cfg, tokenizer, max_steps, cfg.paths.log_dir)
    c = cfg.callbacks
    checkpoint = ckpt.StageCheckpoint(run_dir / "checkpoints", c.checkpoint.every_n_steps, c.checkpoint.keep_last)
    export = RecipeExport(checkpoint, cfg, run_dir)
    callbacks: list[Callback] = [checkpoint, export]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    complete = resume is not None and resume.global_step >= max_steps
    missing = ckpt.missing_at_end(cfg, run_dir, exporting=True) if complete else []
    if complete and not missing:
        log.info(
            f"{cfg.run_name}: training is complete and the run finished: nothing to do (resume=false trains it again)"
        )
        return {}
    if rank_zero_only.rank == 0:
        tracking.record_run(logger, cfg, overrides, run_dir, new_run=resume is None)
        ckpt.start_attempt(cfg, run_dir, overrides, resume.global_step if resume else 0, max_steps)
    trainer = build_trainer(cfg, max_steps, callbacks, logger)
    set_accumulation(trainer, cfg, datamodule.micro_batch_size)
    if complete:
        log.warning(
            f"{cfg.run_name}: training is complete ({resume.global_step} of {max_steps} optimizer steps in "
            f"{resume.path}); this rerun trains nothing and finishes what the interrupted end left out: validation, "
            + ", ".join(missing)
        )
    else:
        log.info(f"{cfg.run_name}: recipe {cfg.stage.recipe.kind}, {max_steps} optimizer steps")
        # weights_only also where Lightning reads without the checkpoint IO (FSDP's sharded folders).
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
        ckpt.raise_if_preempted(checkpoint, logger, run_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # One full validation pass at the end on the fixed validation items: the figures the manifest records
    # (the trainer preset may skip validation during training). A complete run's rerun restores its weights here.
    trainer.limit_val_batches = 1.0
    trainer.validate(
        module, datamodule=datamodule, verbose=False, ckpt_path=resume.path if complete else None, weights_only=True
    )
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if rank_zero_only.rank == 0:
        if complete:
            run_id = getattr(logger, "run_id", None)
            export.finish(module, Path(resume.path), resume.global_step, run_id, export="export" in missing)
        summary = "\n".join(f"{k}: {v:.4g}" for k, v in sorted(metrics.items()))
        tracking.log_artifact_text(logger, summary + "\n", "summary.txt", run_dir)
        print(f"\n{cfg.stage.name} finished: {summary}\nexport: {run_dir / 'export'}")
    return metrics
