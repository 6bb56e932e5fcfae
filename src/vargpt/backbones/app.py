"""The stage-0 recipes' app: a stage with ``stage.recipe`` trains a backbone, not VARGPT.

Everything around the model is the training shell's (vargpt.training.task), as for the VARGPT stages: the
composed config, the Lightning Trainer of ``cfg.trainer``, MLflow tracking, ``last.ckpt`` + every-N checkpoints
with SIGTERM handling and ``resume`` (a complete run's rerun finishes what an interrupted end left out), and
the stage record the next stage reads. What this app brings is the LightningModule and the data
(vargpt.backbones.build), a full validation pass at the end, and the export: the recipe's product as one
safetensors file. Registered on import under every ``stage.recipe.kind``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from vargpt.backbones.build import build_recipe, export_recipe, recipe_config
from vargpt.backbones.recipes import RecipeModule
from vargpt.backbones.streams import StreamDataModule
from vargpt.recipe_config import RecipeConfig, RecipeKind
from vargpt.training import checkpointing as ckpt
from vargpt.training import tracking
from vargpt.training.app import App, RunContext, register_app
from vargpt.training.trainer import build_trainer, set_accumulation

log = logging.getLogger(__name__)


class RecipeExport(Callback):
    """At the end of a completed recipe stage: write the final ``last.ckpt``, export the product, then write the
    stage record (in that order, so the record only ever names a complete run)."""

    def __init__(self, end: ckpt.StageCheckpoint, recipe: RecipeConfig, run: ckpt.StageRun) -> None:
        self.end, self.recipe, self.run = end, recipe, run

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
        out = self.run.run_dir / "export"
        if export:
            export_recipe(module, self.recipe, out)
            log.info("%s: exported %s", self.run.stage, out)
        ckpt.record_finished_stage(self.run, checkpoint, out, run_id, step)


def _build(ctx: RunContext, logger: Any) -> tuple[RecipeModule, StreamDataModule, RecipeExport, pl.Trainer]:
    """The recipe's module and data, its export callback, and the Trainer with its accumulation set."""
    cfg = ctx.cfg
    recipe = recipe_config(cfg.stage.recipe)
    module, datamodule = build_recipe(
        recipe, OmegaConf.to_object(cfg.model), cfg.stage, cfg.data, ctx.tokenizer, ctx.max_steps, cfg.paths.log_dir
    )
    checkpoint = ckpt.StageCheckpoint.of(cfg.callbacks.checkpoint, ctx.run.run_dir)
    export = RecipeExport(checkpoint, recipe, ctx.run)
    callbacks: list[Callback] = [checkpoint, export]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = build_trainer(cfg.trainer, cfg.paths.run_dir, ctx.max_steps, callbacks, logger)
    set_accumulation(trainer, cfg.trainer, cfg.stage.global_batch_size, datamodule.micro_batch_size)
    return module, datamodule, export, trainer


def fit(ctx: RunContext, prepared: None, logger: Any) -> dict[str, float]:
    """Train the recipe, then validate once on the full validation items; export and stage record at the end.

    Raises ``checkpointing.PreemptedError`` when SIGTERM stopped it.
    """
    resume = ctx.resume
    if rank_zero_only.rank == 0:
        ckpt.start_attempt(ctx.run, ctx.overrides, resume.global_step if resume else 0, ctx.max_steps)
    module, datamodule, export, trainer = _build(ctx, logger)
    log.info(f"{ctx.cfg.run_name}: recipe {ctx.cfg.stage.recipe.kind}, {ctx.max_steps} optimizer steps")
    # weights_only also where Lightning reads without the checkpoint IO (FSDP's sharded folders).
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
    ckpt.raise_if_preempted(export.end, logger, ctx.run.run_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(_validate(module, datamodule, trainer, ckpt_path=None))
    if rank_zero_only.rank == 0:
        _summarise(ctx, metrics, logger)
    return metrics


def finish(ctx: RunContext, prepared: None, logger: Any, missing: list[str]) -> dict[str, float]:
    """A complete run's rerun: validate its checkpoint, then export (if missing), stage record and summary."""
    module, datamodule, export, trainer = _build(ctx, logger)
    metrics = _validate(module, datamodule, trainer, ckpt_path=ctx.resume.path)
    if rank_zero_only.rank == 0:
        run_id = getattr(logger, "run_id", None)
        export.finish(module, Path(ctx.resume.path), ctx.resume.global_step, run_id, export="export" in missing)
        _summarise(ctx, metrics, logger)
    return metrics


def _validate(
    module: RecipeModule, datamodule: StreamDataModule, trainer: pl.Trainer, ckpt_path: str | None
) -> dict[str, float]:
    """One full validation pass at the end on the fixed validation items: the figures the manifest records (the
    trainer preset may skip validation during training). ``ckpt_path``: the weights of a complete run's rerun."""
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=datamodule, verbose=False, ckpt_path=ckpt_path, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _summarise(ctx: RunContext, metrics: dict[str, float], logger: Any) -> None:
    """The final figures: printed, in ``summary.txt`` and in MLflow (rank 0)."""
    summary = "\n".join(f"{k}: {v:.4g}" for k, v in sorted(metrics.items()))
    tracking.log_artifact_text(logger, summary + "\n", "summary.txt", ctx.run.run_dir)
    print(f"\n{ctx.cfg.stage.name} finished: {summary}\nexport: {ctx.run.run_dir / 'export'}")


APP = App(
    name="recipe",
    prepare=lambda ctx: None,
    fit=fit,
    finish=finish,
    exports=lambda ctx: True,
    redone=("validation",),
)
register_app([kind.value for kind in RecipeKind], APP)
