"""Checkpoints: periodic and final saves, resume, preemption, stage hand-over and the stage's model export.

* ``<run_dir>/checkpoints/``: ``step0001000.ckpt`` every ``callbacks.checkpoint.every_n_steps`` optimizer steps
  (the newest ``keep_last`` kept), ``last.ckpt`` at every save and at the end. Lightning checkpoints hold the
  model, optimizer, scheduler, loop counters and the data module's ``state_dict`` (its stream position).
  Under ``trainer=fsdp`` each is a folder of per-rank shards (torch distributed checkpoint); consolidate one
  into a single file with ``python -m lightning.fabric.utilities.consolidate_checkpoint <folder>``.
* ``resume``: ``auto`` continues from ``last.ckpt`` when it exists, ``true`` requires it, ``false`` starts
  over, anything else is the checkpoint to continue from.
* SIGTERM (preemption, ``scancel``, a spot instance going away): the handler only sets a flag; at the next
  optimizer-step boundary every rank agrees, ``last.ckpt`` is written and training stops cleanly, so a resume
  loses no optimizer step and no accumulated micro batch.
* Stage hand-over: a finished stage writes ``<log_dir>/stages/<stage>.json`` (checkpoint, export, MLflow run);
  the next stage's ``init_from: previous`` reads it.
* Export: the trained model in the released VARGPT_LLaVA folder layout (``<run_dir>/export``: safetensors in
  bf16 as released, or fp32; config.json with the special tokens; tokenizer; processor configs), which the
  official code and ``vargpt.checkpoint.load_weights`` read.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

log = logging.getLogger(__name__)

LAST = "last.ckpt"


# --------------------------------------------------------------------------------------------- resume
def resolve_resume(resume: str, ckpt_dir: Path) -> str | None:
    """The checkpoint to continue from for ``resume: auto | true | false | PATH``, or None to start fresh."""
    last = ckpt_dir / LAST
    choice = str(resume).strip()
    if choice.lower() == "false":
        return None
    if choice.lower() == "auto":
        return str(last) if last.exists() else None
    if choice.lower() == "true":
        if not last.exists():
            raise FileNotFoundError(f"resume=true but {last} does not exist (use resume=auto to start if missing)")
        return str(last)
    if not Path(choice).exists():
        raise FileNotFoundError(f"resume={choice}: no such checkpoint (expected auto | true | false | a path)")
    return choice


class StageCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (every N optimizer steps, newest ``keep_last`` kept, ``last.ckpt`` at each
    save) that also leaves ``last.ckpt`` at the final step and handles SIGTERM.

    The SIGTERM handler replaces Lightning's own, which stops after the current micro batch, possibly in the
    middle of a gradient accumulation; this one only sets a flag, and at the next optimizer-step boundary
    every rank agrees, ``last.ckpt`` is written and training stops.
    """

    def __init__(self, ckpt_dir: Path, every_n_steps: int, keep_last: int) -> None:
        super().__init__(
            dirpath=ckpt_dir,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            save_last=True,
            save_top_k=keep_last,
            monitor="step",
            mode="max",
            # A resumed run saves the same names again: overwrite instead of adding -v1 copies.
            enable_version_counter=False,
        )
        self.sigterm = False
        self.preempted_at: int | None = None
        self._previous_handler: Any = None

    @property
    def last(self) -> Path:
        return Path(self.dirpath) / LAST

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving at the next optimizer step boundary, then stopping")
        self.sigterm = True

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Installed here, after Lightning registered its handlers at the start of fit.
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        # Any rank that was told to stop stops everyone (a collective per step, one boolean).
        if trainer.strategy.reduce_boolean_decision(self.sigterm, all=False):
            self._save_last_now(trainer)
            self.preempted_at = trainer.global_step
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last_now(trainer)
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


# --------------------------------------------------------------------------------------------- stage hand-over
@dataclass
class StageRecord:
    """What a finished stage leaves for the next one (``<log_dir>/stages/<stage>.json``)."""

    stage: str
    run_name: str
    checkpoint: str
    export_dir: str | None
    mlflow_run_id: str | None
    global_step: int
    finished_at: str


def stage_record_path(log_dir: str | Path, stage: str) -> Path:
    return Path(log_dir).resolve() / "stages" / f"{stage}.json"


def write_stage_record(log_dir: str | Path, record: StageRecord) -> Path:
    path = stage_record_path(log_dir, record.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=2))
    return path


def read_stage_record(log_dir: str | Path, stage: str) -> StageRecord:
    path = stage_record_path(log_dir, stage)
    if not path.exists():
        raise FileNotFoundError(
            f"stage.init_from=previous: no finished '{stage}' stage in this run root ({path} is missing). "
            f"Run stage={stage} first with the same paths.log_dir, or set stage.init_from=null (start from "
            "model.init_from) or stage.init_from=PATH (a checkpoint)"
        )
    return StageRecord(**json.loads(path.read_text()))


def resolve_init_from(
    init_from: str | None, previous_stage: str | None, log_dir: str | Path
) -> tuple[str | None, str | None]:
    """(checkpoint to initialise from, MLflow run id of the stage it came from)."""
    if init_from is None or str(init_from).lower() in ("null", "none", ""):
        return None, None
    if init_from == "previous":
        record = read_stage_record(log_dir, previous_stage)
        return record.checkpoint, record.mlflow_run_id
    if not Path(init_from).exists():
        raise FileNotFoundError(f"stage.init_from={init_from}: no such checkpoint")
    return str(init_from), None


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights into ``model`` before training, strictly, with the checkpoint package's load report.

    ``path``: a Lightning checkpoint file, a sharded (FSDP2) Lightning checkpoint folder (gathered here into one
    state dict), a released or exported VARGPT folder, or anything else ``vargpt.checkpoint.load_weights`` reads.
    """
    from vargpt.checkpoint import load_weights

    path = Path(path)
    log.info(f"initialising the model from {path}")
    source: Any = path
    if path.is_dir() and (path / ".metadata").is_file():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        source = _load_distributed_checkpoint(path)["state_dict"]
    load_weights(model, source, strict=True)


# --------------------------------------------------------------------------------------------- export
def full_model_state(trainer: pl.Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU; a collective under FSDP, complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if isinstance(trainer.strategy, pl.strategies.ModelParallelStrategy):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_model(state: dict[str, torch.Tensor], model: nn.Module, tokenizer: Any, out_dir: Path, dtype: str) -> Path:
    """Write the released VARGPT_LLaVA folder layout (safetensors, config.json with the special tokens, tokenizer,
    processor configs, our model_config.yaml) that the official code and ``vargpt.checkpoint`` load."""
    from vargpt.checkpoint.io import MemorySource
    from vargpt.checkpoint.released import parse_dtype, write_released_folder

    source = MemorySource(state, label="trained model")
    return write_released_folder(out_dir, source, model.cfg, model.ids, dtype=parse_dtype(dtype), tokenizer=tokenizer)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class StageExport(Callback):
    """At the end of a completed stage: export the model and write the stage record for the next stage.

    Runs inside the training processes (the sharded state is gathered with a collective); the final
    ``last.ckpt`` is written right after (Lightning runs checkpoint callbacks last). A preempted run exports
    nothing.
    """

    def __init__(self, end: StageCheckpoint, cfg: Any, tokenizer: Any, run_dir: Path) -> None:
        self.end, self.cfg, self.tokenizer = end, cfg, tokenizer
        self.run_dir = Path(run_dir)
        self.export_dir: Path | None = None
        self.record_path: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end.preempted_at is not None:
            return
        export = self.cfg.callbacks.checkpoint.export
        if export != "none":
            state = full_model_state(trainer, pl_module.model)
            if trainer.is_global_zero:
                model, out = pl_module.model, self.run_dir / "export"
                self.export_dir = export_model(state, model, self.tokenizer, out, export)
        if trainer.is_global_zero:
            logger = trainer.logger
            record = StageRecord(
                stage=self.cfg.stage.name,
                run_name=self.cfg.run_name,
                checkpoint=str(self.end.last),
                export_dir=str(self.export_dir) if self.export_dir else None,
                mlflow_run_id=getattr(logger, "run_id", None),
                global_step=trainer.global_step,
                finished_at=now(),
            )
            self.record_path = write_stage_record(self.cfg.paths.log_dir, record)
