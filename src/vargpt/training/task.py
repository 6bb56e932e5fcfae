"""One training stage from a composed config: build data, model, callbacks, logger and trainer, then fit.

``run(cfg)`` is what ``src/train.py`` calls. In a ``-m`` sweep a failing job is logged, its MLflow run marked
FAILED, and the sweep goes on (Hydra's basic launcher would otherwise abort at the first exception); a single
run re-raises so the exit status tells.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
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
from vargpt.training.callbacks import RunStats, RunSummary, ThroughputMonitor, format_summary, record_summary
from vargpt.training.data import build_data
from vargpt.training.data_health import DataHealth
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
    """Checkpointing, export, throughput, learning rates, any ``callbacks.extra``, data health and the summary."""
    c = cfg.callbacks
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ckpt.StageCheckpoint(ckpt_dir, c.checkpoint.every_n_steps, c.checkpoint.keep_last)
    export = ckpt.StageExport(checkpoint, cfg, tokenizer, run_dir)
    throughput = ThroughputMonitor(c.throughput_window)
    callbacks: list[pl.Callback] = [checkpoint, export, throughput]
    if c.lr_monitor and cfg.logger.backend.value != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks += [instantiate(spec) for spec in c.extra.values()]
    health = DataHealth()  # before the summary, which prints its section
    callbacks += [health, RunSummary(throughput, checkpoint, export, run_dir, tracking.run_location, [health.summary])]
    return callbacks


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage; returns the final metrics (``train/loss`` is what a sweep optimises).

    Raises ``checkpointing.PreemptedError`` when SIGTERM stopped it (after saving). A run whose checkpoint is
    already at the stage's last step trains nothing: it finishes what an interrupted end left out.
    """
    # Resolve once: sub-configs handed to the data and model code must not point back into the root.
    OmegaConf.resolve(cfg)
    run_dir = Path(cfg.paths.run_dir).resolve()
    try:
        validate(cfg)
    except ValueError:
        _discard_unstarted_run_dir(run_dir)
        raise
    overrides, sweep_dir, multirun = _hydra_context()
    _check_launcher(cfg, multirun)
    pl.seed_everything(cfg.seed, workers=True)
    resume = ckpt.resolve_resume(cfg.resume, run_dir / "checkpoints")
    resume_from = resume.path if resume else None
    init_path, parent_run_id = None, None
    if resume is None:  # a resumed run restores everything from its checkpoint: where it started no longer matters
        init_path, parent_run_id = ckpt.resolve_init_from(
            cfg.stage.init_from, cfg.stage.previous_stage, cfg.paths.log_dir
        )
    max_steps = optimizer_steps(cfg.stage.num_samples, cfg.stage.global_batch_size)

    tokenizer, datamodule = build_data(cfg)
    if cfg.stage.recipe is not None:
        return _train_recipe(cfg, tokenizer, run_dir, resume, parent_run_id, overrides, sweep_dir)
    model_cfg = OmegaConf.to_object(cfg.model)
    model = build_vargpt(model_cfg, tokenizer)
    # A fresh run starts from the stage's start (the previous stage), which wins over the model config's
    # (released / LLaVA+VAR weights, embedded backbones).
    start = None if resume_from else (init_path or cfg.model.init_from)
    if start:
        ckpt.load_init_weights(model, start)

    resume_run_id = tracking.saved_run_id(run_dir) if resume_from else None
    tags = tracking.run_tags(cfg, REPO_DIR, parent_run_id, sweep_dir)
    logger = tracking.build_logger(cfg, run_dir, tags, resume_run_id)
    try:
        if rank_zero_only.rank == 0:
            # First, so that a job failing below still leaves a FAILED run with its params in a sweep.
            tracking.record_run(logger, cfg, overrides, run_dir, new_run=resume_run_id is None)
        if resume is not None and resume.global_step >= max_steps:
            return _finish_complete_run(cfg, model, tokenizer, run_dir, resume, logger, max_steps, overrides)
        module = VARGPTModule(model, cfg.stage, cfg.trainer, total_steps=max_steps, seed=cfg.seed)
        if rank_zero_only.rank == 0:
            tracking.log_artifact_text(logger, module.report.table() + "\n", "stage.txt", run_dir)
            ckpt.start_attempt(cfg, run_dir, overrides, resume.global_step if resume else 0, max_steps)
        trainer = build_trainer(cfg, max_steps, build_callbacks(cfg, run_dir, tokenizer), logger)
        accumulate = set_accumulation(trainer, cfg, datamodule.cfg.micro_batch_size)
        log.info(
            f"{cfg.run_name}: {max_steps} optimizer steps of {cfg.stage.global_batch_size} samples "
            f"(micro batch {datamodule.cfg.micro_batch_size} x {trainer.world_size} ranks x {accumulate} accumulation)"
            + (f", resuming from {resume_from}" if resume_from else "")
        )
        # weights_only also where Lightning reads without the checkpoint IO (FSDP's sharded folders).
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        ckpt.raise_if_preempted(trainer.checkpoint_callback, logger, run_dir)
    except ckpt.PreemptedError:
        raise
    except BaseException:
        _record_failure(logger, run_dir)
        raise
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _finish_complete_run(
    cfg: DictConfig,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    resume: ckpt.ResumePoint,
    logger: Any,
    max_steps: int,
    overrides: list[str],
) -> dict[str, float]:
    """A rerun of a run whose checkpoint is at the stage's last step. When a crash or a kill came between the
    final checkpoint and the end of the run, write what it left out (export, stage record, summary) from the
    checkpoint; mark the MLflow run FINISHED either way. Rank 0, no Trainer, no collective."""
    if rank_zero_only.rank != 0:
        return {}
    missing = ckpt.missing_at_end(cfg, run_dir, exporting=cfg.callbacks.checkpoint.export != "none")
    done = (
        f"{cfg.run_name}: training is complete ({resume.global_step} of {max_steps} optimizer steps in {resume.path})"
    )
    if not missing:
        log.info(f"{done} and the run finished: nothing to do (resume=false trains it again)")
    else:
        log.warning(
            f"{done}; this rerun trains nothing and finishes what the interrupted end left out: {', '.join(missing)}"
        )
        ckpt.start_attempt(cfg, run_dir, overrides, resume.global_step, max_steps)
        _write_missing(cfg, model, tokenizer, run_dir, resume, logger, missing)
    if logger is not None:
        logger.finalize("success")
    return {}


def _write_missing(
    cfg: DictConfig,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    resume: ckpt.ResumePoint,
    logger: Any,
    missing: list[str],
) -> None:
    """Export, stage record and summary of a complete run, those in ``missing``, from its checkpoint; then the run
    is marked finished."""
    export_dir = run_dir / "export"
    exporting = cfg.callbacks.checkpoint.export != "none"
    if "export" in missing:
        ckpt.load_init_weights(model, resume.path)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ckpt.export_model(state, model, tokenizer, export_dir, cfg.callbacks.checkpoint.export)
    run_id = getattr(logger, "run_id", None)
    if "stage record" in missing:
        ckpt.record_finished_stage(
            cfg, Path(resume.path), export_dir if exporting else None, run_id, resume.global_step, run_dir
        )
    if "summary" in missing:
        totals = resume.totals
        stats = RunStats(
            steps=resume.global_step,
            samples=int(totals.get("samples", 0)),
            tokens=int(totals.get("tokens", 0)),
            train_seconds=float(totals.get("seconds", 0.0)),
        )
        status = f"DONE (training was complete; this rerun wrote: {', '.join(missing)})"
        location = tracking.run_location(logger)
        text = format_summary(stats, {}, resume.path, str(export_dir) if exporting else None, location, status)
        record_summary(text, stats, run_dir, logger, resume.global_step)
    ckpt.mark_run(run_dir, "finished", resume.global_step)


def _record_failure(logger: Any, run_dir: Path) -> None:
    """A run that raised: its run state says failed, its MLflow run FAILED (rank 0)."""
    if rank_zero_only.rank == 0:
        ckpt.mark_run(run_dir, "failed")
        if logger is not None:
            logger.finalize("failed")


def _discard_unstarted_run_dir(run_dir: Path) -> None:
    """Remove the run folder Hydra made for a run that failed validation, when it holds nothing but Hydra's own
    files (its config copy and log): a mistyped value must not leave a run behind."""
    if not HydraConfig.initialized() or not run_dir.is_dir():
        return
    hc = HydraConfig.get()
    own = {str(hc.output_subdir), f"{hc.job.name}.log"}
    if hc.mode == RunMode.MULTIRUN or Path(hc.run.dir).resolve() != run_dir:  # a sweep's jobs write elsewhere
        return
    if not {p.name for p in run_dir.iterdir()} <= own:
        return
    for name in own:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
    run_dir.rmdir()


def _train_recipe(
    cfg: DictConfig,
    tokenizer: Any,
    run_dir: Path,
    resume: ckpt.ResumePoint | None,
    parent_run_id: str | None,
    overrides: list[str],
    sweep_dir: str | None,
) -> dict[str, float]:
    """A stage-0 recipe (``stage.recipe``): a backbone trained by the same app (vargpt.backbones.app)."""
    from vargpt.backbones.app import train_recipe

    resume_run_id = tracking.saved_run_id(run_dir) if resume else None
    tags = tracking.run_tags(cfg, REPO_DIR, parent_run_id, sweep_dir)
    logger = tracking.build_logger(cfg, run_dir, tags, resume_run_id)
    try:
        return train_recipe(cfg, tokenizer, run_dir, resume, logger, overrides)
    except ckpt.PreemptedError:
        raise
    except BaseException:
        _record_failure(logger, run_dir)
        raise


def run(cfg: DictConfig) -> float:
    """The Hydra task: ``train`` with sweep-safe failure handling; returns the final train loss (NaN if failed).

    A preempted run exits the process with ``PREEMPTED_EXIT_CODE`` (a sweep stops too: its process was told to).
    """
    _, _, multirun = _hydra_context()
    try:
        metrics = train(cfg)
    except ckpt.PreemptedError as stop:
        log.warning(str(stop))
        raise SystemExit(ckpt.PREEMPTED_EXIT_CODE) from None
    except Exception:
        if not multirun:
            raise
        log.exception(f"job {cfg.run_name} failed; the sweep continues")
        return math.nan
    return metrics.get("train/loss", math.nan)
