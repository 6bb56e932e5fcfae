"""The training shell: one stage from a composed config, whatever it trains.

``run(cfg)`` is what ``src/train.py`` calls. The shell validates the config, seeds, finds where the run resumes
or starts, builds the data and the tracking logger, and hands over to the stage's app (vargpt.training.app:
the VARGPT stages and the stage-0 recipes each register one). A run that raises is marked failed here, once,
for every app. In a ``-m`` sweep a failing job is logged, its MLflow run marked FAILED, and the sweep goes on
(Hydra's basic launcher would otherwise abort at the first exception); a single run re-raises so the exit
status tells.
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
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vargpt.config import validate
from vargpt.training import checkpointing as ckpt
from vargpt.training import tracking
from vargpt.training.app import App, RunContext, app_for
from vargpt.training.data import build_data
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


def _check_launcher(trainer_cfg: DictConfig, multirun: bool) -> None:
    """Lightning's ddp/fsdp launcher re-runs the script for each extra rank: in a local sweep every rank would
    run the whole sweep again. Processes created by torchrun or SLURM are fine."""
    external = any(v in os.environ for v in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "RANK"))
    strategy = trainer_cfg.strategy.value
    if multirun and strategy in ("ddp", "fsdp") and not external:
        raise ValueError(
            f"trainer.strategy={strategy} inside a local -m sweep re-launches the sweep per rank: "
            "use trainer=ddp_fork, one process per job, or hydra/launcher=slurm"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage with its registered app; returns the final metrics (``train/loss`` is what a sweep optimises).

    Raises ``checkpointing.PreemptedError`` when SIGTERM stopped it (after saving). A run whose checkpoint is
    already at the stage's last step trains nothing: its app finishes what an interrupted end left out.
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
    _check_launcher(cfg.trainer, multirun)
    app = app_for(cfg.stage)
    pl.seed_everything(cfg.seed, workers=True)
    resume = ckpt.resolve_resume(cfg.resume, run_dir / "checkpoints")
    init_path, parent_run_id = None, None
    if resume is None:  # a resumed run restores everything from its checkpoint: where it started no longer matters
        init_path, parent_run_id = ckpt.resolve_init_from(
            cfg.stage.init_from, cfg.stage.previous_stage, cfg.paths.log_dir
        )
    max_steps = optimizer_steps(cfg.stage.num_samples, cfg.stage.global_batch_size)
    tokenizer, datamodule = build_data(cfg.data, cfg.model)
    resume_run_id = tracking.saved_run_id(run_dir) if resume else None
    run = ckpt.StageRun.of(cfg)
    ctx = RunContext(cfg, run, tokenizer, datamodule, resume, init_path, max_steps, overrides, resume_run_id is None)
    prepared = app.prepare(ctx)
    tags = tracking.run_tags(cfg, REPO_DIR, parent_run_id, sweep_dir)
    logger = tracking.build_logger(cfg, run_dir, tags, resume_run_id)
    try:
        if rank_zero_only.rank == 0:
            # First, so that a job failing below still leaves a FAILED run with its params in a sweep.
            tracking.record_run(logger, cfg, overrides, run_dir, new_run=ctx.new_run)
        if ctx.complete:
            return _finish_complete_run(app, ctx, prepared, logger)
        return app.fit(ctx, prepared, logger)
    except ckpt.PreemptedError:
        raise
    except BaseException:
        _record_failure(logger, run_dir)
        raise


def _finish_complete_run(app: App, ctx: RunContext, prepared: Any, logger: Any) -> dict[str, float]:
    """A rerun of a run whose checkpoint is at the stage's last step. When a crash or a kill came between the
    final checkpoint and the end of the run, the app writes what it left out (export, stage record, summary)
    from the checkpoint; the MLflow run is marked FINISHED either way."""
    missing = ckpt.missing_at_end(ctx.run, exporting=app.exports(ctx))
    resume = ctx.resume
    steps = f"{resume.global_step} of {ctx.max_steps} optimizer steps in {resume.path}"
    done = f"{ctx.cfg.run_name}: training is complete ({steps})"
    metrics: dict[str, float] = {}
    if not missing:
        if rank_zero_only.rank == 0:
            log.info(f"{done} and the run finished: nothing to do (resume=false trains it again)")
    else:
        if rank_zero_only.rank == 0:
            log.warning(
                f"{done}; this rerun trains nothing and finishes what the interrupted end left out: "
                + ", ".join([*app.redone, *missing])
            )
            ckpt.start_attempt(ctx.run, ctx.overrides, resume.global_step, ctx.max_steps)
        metrics = app.finish(ctx, prepared, logger, missing)
    if rank_zero_only.rank == 0 and logger is not None:
        logger.finalize("success")
    return metrics


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
