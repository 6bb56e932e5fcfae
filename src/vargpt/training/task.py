"""One training stage from a composed config: build data, model, callbacks, logger and trainer, then fit.

``run(cfg)`` is what ``src/train.py`` calls. In a ``-m`` sweep a failing job is logged, its MLflow run marked
FAILED, and the sweep goes on (Hydra's basic launcher would otherwise abort at the first exception); a single
run re-raises so the exit status tells.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vargpt.config import validate
from vargpt.model import build_vargpt
from vargpt.training import checkpointing as ckpt
from vargpt.training import tracking
from vargpt.training.callbacks import RunSummary, ThroughputMonitor
from vargpt.training.data import build_data
from vargpt.training.lightning_module import VARGPTModule, build_trainer, set_accumulation
from vargpt.training.optim import optimizer_steps

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[3]


def _hydra_context() -> tuple[list[str], str | None, bool]:
    """(command-line overrides, sweep folder or None, is a multirun job); empty outside Hydra."""
    if not HydraConfig.initialized():
        return [], None, False
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return list(hc.overrides.task), (str(hc.sweep.dir) if multirun else None), multirun


def _check_launcher(cfg: DictConfig, multirun: bool) -> None:
    """Lightning's ddp/fsdp launcher re-runs the script for each extra rank: in a local sweep every rank would
    run the whole sweep again. Processes created by torchrun or SLURM are fine."""
    external = any(v in os.environ for v in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "RANK"))
    if multirun and cfg.trainer.strategy.value in ("ddp", "fsdp") and not external:
        raise ValueError(
            f"trainer.strategy={cfg.trainer.strategy.value} inside a local -m sweep re-launches the sweep per rank: "
            "use trainer=ddp_fork, one process per job, or hydra/launcher=slurm"
        )


def build_callbacks(cfg: DictConfig, run_dir: Path, tokenizer: Any) -> list[pl.Callback]:
    """Checkpointing, export, throughput, learning rates, summary, and any ``callbacks.extra``."""
    c = cfg.callbacks
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ckpt.StageCheckpoint(ckpt_dir, c.checkpoint.every_n_steps, c.checkpoint.keep_last)
    export = ckpt.StageExport(checkpoint, cfg, tokenizer, run_dir)
    throughput = ThroughputMonitor(c.throughput_window)
    callbacks: list[pl.Callback] = [checkpoint, export, throughput]
    if c.lr_monitor and cfg.logger.backend.value != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks += [instantiate(spec) for spec in c.extra.values()]
    callbacks.append(RunSummary(throughput, checkpoint, export, run_dir, tracking.run_location))
    return callbacks


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage; returns the final metrics (``train/loss`` is what a sweep optimises)."""
    # Resolve once: sub-configs handed to the data and model code must not point back into the root.
    OmegaConf.resolve(cfg)
    validate(cfg)
    overrides, sweep_dir, multirun = _hydra_context()
    _check_launcher(cfg, multirun)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir).resolve()
    resume_from = ckpt.resolve_resume(cfg.resume, run_dir / "checkpoints")
    init_path, parent_run_id = ckpt.resolve_init_from(cfg.stage.init_from, cfg.stage.previous_stage, cfg.paths.log_dir)

    tokenizer, datamodule = build_data(cfg)
    if cfg.stage.recipe is not None:
        return _train_recipe(cfg, tokenizer, run_dir, resume_from, parent_run_id, overrides, sweep_dir)
    model_cfg = OmegaConf.to_object(cfg.model)
    model = build_vargpt(model_cfg, tokenizer)
    # A resumed run restores everything from its checkpoint; otherwise the stage's start (the previous stage)
    # wins over the model config's (released / LLaVA+VAR weights, embedded backbones).
    start = None if resume_from else (init_path or cfg.model.init_from)
    if start:
        ckpt.load_init_weights(model, start)
    max_steps = optimizer_steps(cfg.stage.num_samples, cfg.stage.global_batch_size)
    module = VARGPTModule(model, cfg.stage, cfg.trainer, total_steps=max_steps, seed=cfg.seed)

    resume_run_id = tracking.saved_run_id(run_dir) if resume_from else None
    tags = tracking.run_tags(cfg, REPO_DIR, parent_run_id, sweep_dir)
    logger = tracking.build_logger(cfg, run_dir, tags, resume_run_id)
    try:
        if rank_zero_only.rank == 0:
            # First, so that a job failing below still leaves a FAILED run with its params in a sweep.
            tracking.record_run(logger, cfg, overrides, run_dir, new_run=resume_run_id is None)
            tracking.log_artifact_text(logger, module.report.table() + "\n", "stage.txt", run_dir)
        trainer = build_trainer(cfg, max_steps, build_callbacks(cfg, run_dir, tokenizer), logger)
        accumulate = set_accumulation(trainer, cfg, datamodule.cfg.micro_batch_size)
        log.info(
            f"{cfg.run_name}: {max_steps} optimizer steps of {cfg.stage.global_batch_size} samples "
            f"(micro batch {datamodule.cfg.micro_batch_size} x {trainer.world_size} ranks x {accumulate} accumulation)"
            + (f", resuming from {resume_from}" if resume_from else "")
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except BaseException:
        if logger is not None and rank_zero_only.rank == 0:
            logger.finalize("failed")
        raise
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _train_recipe(
    cfg: DictConfig,
    tokenizer: Any,
    run_dir: Path,
    resume_from: str | None,
    parent_run_id: str | None,
    overrides: list[str],
    sweep_dir: str | None,
) -> dict[str, float]:
    """A stage-0 recipe (``stage.recipe``): a backbone trained by the same app (vargpt.backbones.app)."""
    from vargpt.backbones.app import train_recipe

    resume_run_id = tracking.saved_run_id(run_dir) if resume_from else None
    tags = tracking.run_tags(cfg, REPO_DIR, parent_run_id, sweep_dir)
    logger = tracking.build_logger(cfg, run_dir, tags, resume_run_id)
    try:
        return train_recipe(cfg, tokenizer, run_dir, resume_from, logger, overrides)
    except BaseException:
        if logger is not None and rank_zero_only.rank == 0:
            logger.finalize("failed")
        raise


def run(cfg: DictConfig) -> float:
    """The Hydra task: ``train`` with sweep-safe failure handling; returns the final train loss (NaN if failed)."""
    _, _, multirun = _hydra_context()
    try:
        metrics = train(cfg)
    except Exception:
        if not multirun:
            raise
        log.exception(f"job {cfg.run_name} failed; the sweep continues")
        return math.nan
    return metrics.get("train/loss", math.nan)
