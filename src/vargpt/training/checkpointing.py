"""Checkpoints: periodic and final saves, resume, preemption, stage hand-over and the stage's model export.

* ``<run_dir>/checkpoints/``: ``step0001000.ckpt`` every ``callbacks.checkpoint.every_n_steps`` optimizer steps
  (the newest ``keep_last`` kept), ``last.ckpt`` at every save and at the end. Lightning checkpoints hold the
  model, optimizer, scheduler, loop counters and the data module's ``state_dict`` (its stream position).
  Under ``trainer=fsdp`` each is a folder of per-rank shards (torch distributed checkpoint); consolidate one
  into a single file with ``python -m lightning.fabric.utilities.consolidate_checkpoint <folder>``.
* ``resume``: ``auto`` continues from ``last.ckpt`` when it exists, ``true`` requires it, ``false`` starts
  over, anything else is the checkpoint to continue from. Every resume checkpoint is read with
  ``vargpt.checkpoint.io``'s safe reader (``weights_only=True`` whatever the environment says; Lightning's own
  load goes through :class:`SafeCheckpointIO`). A damaged ``last.ckpt`` falls back to the newest intact
  ``step*.ckpt``, saying so. A run whose checkpoint is already at the stage's last step is complete: the
  rerun only finishes what an interrupted end left out (export, stage record, summary, MLflow status).
* SIGTERM (preemption, ``scancel``, a spot instance going away): the handler only sets a flag; at the next
  optimizer-step boundary every rank agrees, ``last.ckpt`` is written and training stops cleanly, so a resume
  loses no optimizer step and no accumulated micro batch. The process then exits with
  :data:`PREEMPTED_EXIT_CODE` (143), which a scheduler reads as "requeue" (docs/faults.md).
* Stage hand-over: a finished stage writes ``<log_dir>/stages/<stage>.json`` (checkpoint, export, MLflow run)
  after its final checkpoint; the next stage's ``init_from: previous`` reads it, and refuses while the newest
  run of that stage is unfinished (``runs/<run>/run_state.json``: running, preempted, failed or finished).
* Export: the trained model in the released VARGPT_LLaVA folder layout (``<run_dir>/export``: safetensors in
  bf16 as released, or fp32; config.json with the special tokens; tokenizer; processor configs), which the
  official code and ``vargpt.checkpoint.load_weights`` read.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from vargpt.checkpoint import load_weights
from vargpt.checkpoint.io import CheckpointFormatError, CorruptCheckpointError, MemorySource, load_torch_object
from vargpt.checkpoint.released import write_released_folder
from vargpt.checkpoint.released_config import parse_dtype
from vargpt.checkpoint.report import CheckpointMismatchError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
RUN_STATE = "run_state.json"
# The exit status of a preempted stage: 128 + SIGTERM, what the shell reports for a job SIGTERM ended, so the
# schedulers' rules for preempted jobs apply (SLURM: RequeueExit=143; Kubernetes: podFailurePolicy onExitCodes).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class PreemptedError(Exception):
    """A stage stopped by SIGTERM after saving ``last.ckpt``; ``src/train.py`` exits with PREEMPTED_EXIT_CODE."""


# --------------------------------------------------------------------------------------------- resume
@dataclass
class ResumePoint:
    """A checkpoint to continue from, read with the safe reader before Lightning restores it."""

    path: str
    global_step: int
    # The throughput monitor's run totals at the save (samples, tokens, seconds): a summary written without
    # training reports them.
    totals: dict[str, float] = field(default_factory=dict)


def read_resume_point(path: str | Path) -> ResumePoint:
    """The step and run totals of a Lightning checkpoint (a file, or an FSDP folder's ``meta.pt``), read with
    ``weights_only=True``: a pickle that would run code raises ``UnsafeCheckpointError``, a damaged file
    ``CorruptCheckpointError``, both naming the file."""
    path = Path(path)
    meta = path / _METADATA_FILENAME if path.is_dir() else path
    state = load_torch_object(meta, mmap=True)
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointFormatError(f"{meta}: not a training checkpoint of this app (no global_step)")
    totals = state.get("callbacks", {}).get("ThroughputMonitor", {})
    return ResumePoint(str(path), int(state["global_step"]), dict(totals))


def resolve_resume(resume: str, ckpt_dir: Path) -> ResumePoint | None:
    """The checkpoint to continue from for ``resume: auto | true | false | PATH``, or None to start fresh.

    ``auto``/``true`` read ``last.ckpt`` and, when it is damaged, fall back to the newest intact periodic
    checkpoint: the run's own earlier state, from which resume replays the same steps exactly. A PATH is used
    as given (no fallback: it names one file).
    """
    last = ckpt_dir / LAST
    choice = str(resume).strip()
    if choice.lower() == "false":
        return None
    if choice.lower() == "auto" and not last.exists():
        return None
    if choice.lower() in ("auto", "true"):
        if not last.exists():
            raise FileNotFoundError(f"resume=true but {last} does not exist (use resume=auto to start if missing)")
        return _last_or_fallback(last)
    if not Path(choice).exists():
        raise FileNotFoundError(f"resume={choice}: no such checkpoint (expected auto | true | false | a path)")
    return read_resume_point(choice)


def _last_or_fallback(last: Path) -> ResumePoint:
    """``last.ckpt``, or the newest intact ``step*.ckpt`` beside it when ``last.ckpt`` is damaged."""
    try:
        return read_resume_point(last)
    except CorruptCheckpointError as damaged:
        # Zero-padded step numbers: the names sort by step.
        for candidate in sorted(last.parent.glob("step*.ckpt"), reverse=True):
            try:
                point = read_resume_point(candidate)
            except CorruptCheckpointError:
                continue
            log.warning(
                f"{damaged}\nresuming from {candidate} instead (step {point.global_step}), the newest intact "
                "periodic checkpoint: the steps after it are trained again"
            )
            return point
        raise CorruptCheckpointError(
            f"{damaged}\nNo intact step*.ckpt in {last.parent} to fall back to: restore {last.name}, or start "
            "the run over with resume=false"
        ) from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file IO with every read through ``vargpt.checkpoint.io.load_torch_object``
    (``weights_only=True``, whatever Lightning passes or the environment says). Saving is Lightning's."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Read into memory (no mmap): the optimizer state restored from it is updated in place while training.
        return load_torch_object(path, mmap=False)


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

    @classmethod
    def of(cls, c: Any, run_dir: Path) -> StageCheckpoint:
        """From the ``callbacks.checkpoint`` section ``c``, saving under ``<run_dir>/checkpoints``."""
        return cls(Path(run_dir) / "checkpoints", c.every_n_steps, c.keep_last)

    @property
    def last(self) -> Path:
        return Path(self.dirpath) / LAST

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving at the next optimizer step boundary, then stopping")
        self.sigterm = True

    def save_last_now(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` for the current step unless it was written already (a collective under FSDP)."""
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
            self.save_last_now(trainer)
            self.preempted_at = trainer.global_step
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_last_now(trainer)
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


# --------------------------------------------------------------------------------------------- run state
@dataclass(frozen=True)
class StageRun:
    """Which run of which stage this is, and where it writes: all the run-state and stage-record code reads."""

    stage: str
    run_name: str
    # The run root (``paths.log_dir``): stage records and every stage's runs live under it.
    log_dir: Path
    # This run's folder (``paths.run_dir``).
    run_dir: Path

    @classmethod
    def of(cls, cfg: Any) -> StageRun:
        """From the composed root config (its stage name, run name and paths)."""
        return cls(cfg.stage.name, cfg.run_name, Path(cfg.paths.log_dir), Path(cfg.paths.run_dir).resolve())


@dataclass
class RunState:
    """Where a run of a stage stands (``<run_dir>/run_state.json``), so the next stage can tell whether the newest
    run of its parent stage finished. ``state``: running (also left by a kill or a crash), preempted, failed,
    finished (its stage record is written)."""

    stage: str
    run_name: str
    state: str
    global_step: int
    max_steps: int
    # time.time() of the newest attempt: orders the runs of a stage.
    started: float
    # The command that continues the run (the same command resumes it).
    command: str


def write_run_state(run_dir: Path, state: RunState) -> None:
    _write_json_atomically(Path(run_dir) / RUN_STATE, asdict(state))


def mark_run(run_dir: Path, state: str, global_step: int | None = None) -> None:
    """Update the state (and step) of a run that has a ``run_state.json``."""
    path = Path(run_dir) / RUN_STATE
    if not path.is_file():
        return
    current = RunState(**json.loads(path.read_text()))
    current.state = state
    if global_step is not None:
        current.global_step = global_step
    write_run_state(run_dir, current)


def start_attempt(run: StageRun, overrides: list[str], global_step: int, max_steps: int) -> None:
    """Record a new attempt of this run (state running, now the newest run of its stage)."""
    command = " ".join(["python src/train.py", *(shlex.quote(o) for o in overrides)])
    state = RunState(run.stage, run.run_name, "running", global_step, max_steps, time.time(), command)
    write_run_state(run.run_dir, state)


def missing_at_end(run: StageRun, exporting: bool) -> list[str]:
    """What a run whose training is complete still lacks: "export", "stage record", "summary". Before its run
    state says finished, everything (an export folder may be half written; the record comes after it)."""
    path = run.run_dir / RUN_STATE
    finished = path.is_file() and json.loads(path.read_text())["state"] == "finished"
    have = {
        "export": not exporting or (run.run_dir / "export").is_dir(),
        "stage record": stage_record_path(run.log_dir, run.stage).is_file(),
        "summary": (run.run_dir / "summary.txt").is_file(),
    }
    return [name for name, present in have.items() if not (finished and present)]


def newest_run(log_dir: str | Path, stage: str) -> tuple[Path, RunState] | None:
    """(run folder, state) of the most recently started run of ``stage`` under ``log_dir``, or None."""
    found = []
    for path in (Path(log_dir).resolve() / "runs").glob(f"*/{RUN_STATE}"):
        state = RunState(**json.loads(path.read_text()))
        if state.stage == stage:
            found.append((state.started, path.parent, state))
    if not found:
        return None
    _, run_dir, state = max(found, key=lambda t: t[0])
    return run_dir, state


def _write_json_atomically(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class UnfinishedStageError(RuntimeError):
    """The newest run of a stage the next stage starts from did not finish."""


def raise_if_preempted(end: StageCheckpoint, logger: Any, run_dir: Path) -> None:
    """After ``trainer.fit``: a run SIGTERM stopped is recorded as preempted (MLflow: KILLED) and raises
    :class:`PreemptedError`, so the process exits with PREEMPTED_EXIT_CODE instead of 0."""
    if end.preempted_at is None:
        return
    if pl.utilities.rank_zero_only.rank == 0:
        mark_run(run_dir, "preempted", end.preempted_at)
        if logger is not None:
            logger.finalize("KILLED")  # Lightning marked it FINISHED at the end of fit
    raise PreemptedError(
        f"preempted (SIGTERM) at step {end.preempted_at}, saved to {end.last}: rerun the same command to resume "
        f"(exit status {PREEMPTED_EXIT_CODE})"
    )


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
    _write_json_atomically(path, asdict(record))
    return path


def record_finished_stage(
    run: StageRun, checkpoint: Path, export_dir: Path | None, run_id: str | None, global_step: int
) -> Path:
    """Write the stage record of a completed run (its final checkpoint is on disk) and mark the run finished."""
    record = StageRecord(
        stage=run.stage,
        run_name=run.run_name,
        checkpoint=str(checkpoint),
        export_dir=str(export_dir) if export_dir else None,
        mlflow_run_id=run_id,
        global_step=global_step,
        finished_at=now(),
    )
    path = write_stage_record(run.log_dir, record)
    mark_run(run.run_dir, "finished", global_step)
    return path


def read_stage_record(log_dir: str | Path, stage: str) -> StageRecord:
    """The record of the finished ``stage``; refuses while the newest run of that stage is unfinished (a record
    of an older run would silently hand over that one instead)."""
    path = stage_record_path(log_dir, stage)
    newest = newest_run(log_dir, stage)
    if newest is not None and newest[1].state != "finished":
        run_dir, state = newest
        how = {
            "running": "still running, or killed or crashed without a clean stop",
            "preempted": "preempted",
            "failed": "failed",
        }.get(state.state, state.state)
        older = f" (the last finished one's is {json.loads(path.read_text())['checkpoint']})" if path.exists() else ""
        raise UnfinishedStageError(
            f"the newest '{stage}' run, {state.run_name} ({run_dir}), is unfinished: {how}, at step "
            f"{state.global_step} of {state.max_steps}. Finish it by rerunning the same command (it resumes from its "
            f"last checkpoint):\n    {state.command}\nor start from another checkpoint with "
            f"stage.init_from=PATH{older}"
        )
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
    The training app loads strictly only: a mismatch names the keys and the command-line way to start from what
    fits (the API's ``strict=False`` has no config key).
    """
    path = Path(path)
    log.info(f"initialising the model from {path}")
    source: Any = path
    if path.is_dir() and (path / ".metadata").is_file():
        source = _load_distributed_checkpoint(path)["state_dict"]
    try:
        load_weights(model, source, strict=True)
    except CheckpointMismatchError as err:
        lines = str(err).splitlines()
        if "strict=False" in lines[-1]:
            lines = lines[:-1]  # the Python API's way out, which the command line cannot take
        lines.append(
            f"The training app loads strictly. To start from what fits, convert {path} once with "
            "`python -m vargpt.convert --to released --no-strict --in PATH --config MODEL_YAML --tokenizer DIR "
            "--out NEW` (the report lists what it skips) and set model.init_from=NEW; or pick the model config "
            "the checkpoint was trained with (model=...)"
        )
        raise _mismatch(err, "\n".join(lines)) from None


def _mismatch(err: CheckpointMismatchError, message: str) -> CheckpointMismatchError:
    """The same mismatch (its report kept) with another message."""
    out = CheckpointMismatchError(err.report)
    out.args = (message,)
    return out


# --------------------------------------------------------------------------------------------- export
def full_model_state(trainer: pl.Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU; a collective under FSDP, complete on rank 0."""
    # Here, not at the top: torch builds without distributed support lack it, and only FSDP runs need it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if isinstance(trainer.strategy, pl.strategies.ModelParallelStrategy):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_model(state: dict[str, torch.Tensor], model: nn.Module, tokenizer: Any, out_dir: Path, dtype: str) -> Path:
    """Write the released VARGPT_LLaVA folder layout (safetensors, config.json with the special tokens, tokenizer,
    processor configs, our model_config.yaml) that the official code and ``vargpt.checkpoint`` load."""
    source = MemorySource(state, label="trained model")
    return write_released_folder(out_dir, source, model.cfg, model.ids, dtype=parse_dtype(dtype), tokenizer=tokenizer)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class StageExport(Callback):
    """At the end of a completed stage: write the final ``last.ckpt``, export the model, then write the stage
    record for the next stage (in that order, so the record only ever names a complete run).

    Runs inside the training processes (the sharded state is gathered with a collective). A preempted run
    exports nothing. ``finish`` is also what a rerun of a complete run calls (vargpt_app.py), without a Trainer.
    ``dtype``: ``callbacks.checkpoint.export`` (bf16, fp32, or none: no export).
    """

    def __init__(self, end: StageCheckpoint, dtype: str, tokenizer: Any, run: StageRun) -> None:
        self.end, self.dtype, self.tokenizer, self.run = end, dtype, tokenizer, run
        self.export_dir: Path | None = None
        self.record_path: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end.preempted_at is not None:
            return
        self.end.save_last_now(trainer)
        exporting = self.dtype != "none"
        state = full_model_state(trainer, pl_module.model) if exporting else None
        if trainer.is_global_zero:
            self.finish(pl_module.model, state, getattr(trainer.logger, "run_id", None), trainer.global_step)

    def finish(self, model: nn.Module, state: dict[str, torch.Tensor] | None, run_id: str | None, step: int) -> None:
        """Export ``state`` (None: nothing to export) and write the stage record (rank 0)."""
        if state is not None:
            out = self.run.run_dir / "export"
            self.export_dir = export_model(state, model, self.tokenizer, out, self.dtype)
        self.record_path = record_finished_stage(self.run, self.end.last, self.export_dir, run_id, step)
