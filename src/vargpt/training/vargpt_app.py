"""The VARGPT stages' app (stages without ``stage.recipe``): VARGPT, its callbacks, its released-layout export.

Registered under ``VARGPT_KEY`` on import; the training shell (task.py) drives it (vargpt.training.app).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vargpt.model import build_vargpt
from vargpt.training import checkpointing as ckpt
from vargpt.training import tracking
from vargpt.training.app import VARGPT_KEY, App, RunContext, register_app
from vargpt.training.callbacks import RunStats, RunSummary, ThroughputMonitor, format_summary, record_summary
from vargpt.training.data_health import DataHealth
from vargpt.training.lightning_module import VARGPTModule
from vargpt.training.materialize import build_for_sharded_start
from vargpt.training.preference_module import PreferenceModule, check_precomputed_reference, preference_settings
from vargpt.training.trainer import build_trainer, set_accumulation

log = logging.getLogger(__name__)


def build_callbacks(c: DictConfig, logging_on: bool, run: ckpt.StageRun, tokenizer: Any) -> list[pl.Callback]:
    """Checkpointing, export, throughput, learning rates (``logging_on``: a logger backend is set), any
    ``callbacks.extra``, data health and the summary, from the callbacks section ``c``."""
    checkpoint = ckpt.StageCheckpoint.of(c.checkpoint, run.run_dir)
    export = ckpt.StageExport(checkpoint, c.checkpoint.export, tokenizer, run)
    throughput = ThroughputMonitor(c.throughput_window)
    callbacks: list[pl.Callback] = [checkpoint, export, throughput]
    if c.lr_monitor and logging_on:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks += [instantiate(spec) for spec in c.extra.values()]
    health = DataHealth()  # before the summary, which prints its section
    callbacks += [
        health,
        RunSummary(throughput, checkpoint, export, run.run_dir, tracking.run_location, [health.summary]),
    ]
    return callbacks


def _exports(ctx: RunContext) -> bool:
    """Whether the stage exports the released-layout folder (``callbacks.checkpoint.export`` is not none)."""
    return ctx.cfg.callbacks.checkpoint.export != "none"


def prepare(ctx: RunContext) -> Any:
    """The VARGPT of ``cfg.model`` with its start weights. A fresh run starts from the stage's start (the previous
    stage), which wins over the model config's (released / LLaVA+VAR weights, embedded backbones); a resumed
    run's weights come from its checkpoint.

    Under FSDP (``trainer.fsdp.meta_init``, on by default) the model is built on the meta device and each rank
    later fills only its own shards (``training.materialize``), except where that module says it cannot; the
    rerun of a complete run and the preference stages (their reference copies and checks read the weights
    before sharding) build it whole, as DDP and one device do."""
    start = None if ctx.resume else (ctx.init_path or ctx.cfg.model.init_from)
    sharded = ctx.cfg.trainer.strategy.value == "fsdp" and ctx.cfg.trainer.fsdp.meta_init
    if sharded and ctx.cfg.stage.preference is None and not ctx.complete:
        cfg_model = OmegaConf.to_object(ctx.cfg.model)
        lean = build_for_sharded_start(cfg_model, ctx.tokenizer, start or None, resume=ctx.resume is not None)
        if lean is not None:
            return lean
    model = build_vargpt(OmegaConf.to_object(ctx.cfg.model), ctx.tokenizer)
    if start:
        ckpt.load_init_weights(model, start)
    return model


def build_module(ctx: RunContext, model: Any) -> VARGPTModule:
    """The stage's LightningModule: the VARGPT one, or the preference one for a stage with ``stage.preference``
    (with a frozen copy of the stage's starting model as its reference when the stage asks for one)."""
    cfg = ctx.cfg
    if cfg.stage.preference is None:
        return VARGPTModule(model, cfg.stage, cfg.trainer, total_steps=ctx.max_steps, seed=cfg.seed)
    reference = None
    if preference_settings(cfg.stage).uses_reference:
        if cfg.stage.preference.reference.value == "frozen_copy":
            reference = _starting_model(ctx, model)
        elif ctx.resume is None:  # the model holds the start's weights only before training
            data = ctx.datamodule.cfg
            settings = {"target": data.pair_target, "gen_codes": data.gen_codes}
            settings["gen_resize_ratio"] = data.gen_resize_ratio
            check_precomputed_reference(model, ctx.datamodule.source_dirs(), settings)
    return PreferenceModule(model, cfg.stage, cfg.trainer, ctx.max_steps, cfg.seed, reference=reference)


def _starting_model(ctx: RunContext, model: Any) -> Any:
    """A copy of the model the stage started from: the model itself before a fresh run trains it; for a resumed
    run, rebuilt from the stage's start (its resumed weights are not the start)."""
    if ctx.resume is None:
        return copy.deepcopy(model)
    cfg = ctx.cfg
    start, _ = ckpt.resolve_init_from(cfg.stage.init_from, cfg.stage.previous_stage, cfg.paths.log_dir)
    start = start or cfg.model.init_from
    if not start:
        raise ValueError(
            "stage.preference.reference=frozen_copy: the reference is the starting model, which a resumed run "
            "rebuilds from its start weights, but the stage has none (set stage.init_from or model.init_from)"
        )
    reference = build_vargpt(OmegaConf.to_object(cfg.model), ctx.tokenizer)
    ckpt.load_init_weights(reference, start)
    return reference


def fit(ctx: RunContext, model: Any, logger: Any) -> dict[str, float]:
    """Train the stage; the export and the stage record are written by the callbacks at the end."""
    cfg, run, resume = ctx.cfg, ctx.run, ctx.resume
    module = build_module(ctx, model)
    if rank_zero_only.rank == 0:
        tracking.log_artifact_text(logger, module.report.table() + "\n", "stage.txt", run.run_dir)
        ckpt.start_attempt(run, ctx.overrides, resume.global_step if resume else 0, ctx.max_steps)
    logging_on = cfg.logger.backend.value != "none"
    callbacks = build_callbacks(cfg.callbacks, logging_on, run, ctx.tokenizer)
    trainer = build_trainer(cfg.trainer, cfg.paths.run_dir, ctx.max_steps, callbacks, logger)
    micro = ctx.datamodule.cfg.micro_batch_size
    accumulate = set_accumulation(trainer, cfg.trainer, cfg.stage.global_batch_size, micro)
    resume_from = resume.path if resume else None
    log.info(
        f"{cfg.run_name}: {ctx.max_steps} optimizer steps of {cfg.stage.global_batch_size} samples "
        f"(micro batch {micro} x {trainer.world_size} ranks x {accumulate} accumulation)"
        + (f", resuming from {resume_from}" if resume_from else "")
    )
    # weights_only also where Lightning reads without the checkpoint IO (FSDP's sharded folders).
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=resume_from, weights_only=True)
    ckpt.raise_if_preempted(trainer.checkpoint_callback, logger, run.run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def finish(ctx: RunContext, model: Any, logger: Any, missing: list[str]) -> dict[str, float]:
    """Export, stage record and summary of a complete run, those in ``missing``, from its checkpoint; then the run
    is marked finished. Rank 0, no Trainer, no collective."""
    if rank_zero_only.rank != 0:
        return {}
    run, resume = ctx.run, ctx.resume
    export_dir = run.run_dir / "export"
    exporting = _exports(ctx)
    if "export" in missing:
        ckpt.load_init_weights(model, resume.path)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ckpt.export_model(state, model, ctx.tokenizer, export_dir, ctx.cfg.callbacks.checkpoint.export)
    if "stage record" in missing:
        run_id = getattr(logger, "run_id", None)
        ckpt.record_finished_stage(
            run, Path(resume.path), export_dir if exporting else None, run_id, resume.global_step
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
        record_summary(text, stats, run.run_dir, logger, resume.global_step)
    ckpt.mark_run(run.run_dir, "finished", resume.global_step)
    return {}


APP = App(name="vargpt", prepare=prepare, fit=fit, finish=finish, exports=_exports)
register_app([VARGPT_KEY], APP)
