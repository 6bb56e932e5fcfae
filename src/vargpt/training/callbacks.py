"""Training callbacks: throughput, MFU and peak memory while training, and the end-of-run summary.

MFU's numerator is ``vargpt.training.flops`` (the count the bench scripts use: useful tokens only, AdaLN per
image, attention over the pairs the masks allow; its docstring says what MFU counts), its denominator the
device's peak from Lightning's ``get_available_flops``.

The monitor adds nothing to the step's critical path: per micro batch it queues the batch's token counts
(``token_counts``, a few small device ops) onto a device accumulator and adds the batch's sizes (tensor
shapes) on the host; it reads the accumulator back once per log interval. That read waits for the device, so
the wall time between two reads is the time the device took for the steps between them.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

from vargpt.training.flops import TOKEN_COUNT_FIELDS, BatchShape, VARGPTFlops, token_counts

# Where token_counts' values go in a BatchShape's field tuple.
TOKEN_INDEX = [[f.name for f in fields(BatchShape)].index(name) for name in TOKEN_COUNT_FIELDS]


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def is_log_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning hands this optimizer step's logged values to the logger (its ``log_every_n_steps``
    cadence; called after the step, when ``global_step`` counts it)."""
    n = trainer.log_every_n_steps
    return n > 0 and trainer.global_step % n == 0


@dataclass
class RunStats:
    """Totals of a run for the summary: samples and tokens of all ranks, kept across resumes."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    # None when not measured (a summary written by a rerun that finished a complete run without training).
    peak_memory_gib: float | None = None
    mfu: float | None = None


class ThroughputMonitor(Callback):
    """Logs perf/{step_time, samples_per_sec, tokens_per_sec, tflops_per_sec_per_device, mfu, peak_memory_gib}.

    Reads its device counters at Lightning's log steps once at least ``window`` optimizer steps have passed
    since the previous read, and logs rates over those steps (the first interval includes start-up); also reads
    them when a checkpoint is written and when training ends, for the run totals. Samples and tokens are summed
    over ranks; FLOP/s and MFU are per device (averaged over ranks). Tokens are real (unpadded) LLM tokens.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = max(1, window)
        self.stats = RunStats()
        self._counter: VARGPTFlops | None = None
        self._trainer: pl.Trainer | None = None
        self._sizes = BatchShape()  # host: shapes of the micro batches since the last read
        self._tokens_3: torch.Tensor | None = None  # device: their token_counts, summed
        self._steps_since = 0
        self._t_read = 0.0

    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None:
            self._read(self._trainer)  # a checkpoint holds every sample trained on so far
        return {"samples": self.stats.samples, "tokens": self.stats.tokens, "seconds": self.stats.train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.samples, self.stats.tokens = state["samples"], state["tokens"]
        self.stats.train_seconds = state["seconds"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counter = VARGPTFlops(pl_module.model)
        self._trainer = trainer
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self.available = get_available_flops(trainer.strategy.root_device, dtype)
        self._t_read = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sizes = self._sizes + BatchShape.sizes(batch)
        counts_3 = token_counts(batch)
        self._tokens_3 = counts_3 if self._tokens_3 is None else self._tokens_3 + counts_3
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self._steps_since += 1
        if self._steps_since < self.window or not is_log_step(trainer):
            return
        steps, (shape, seconds) = self._steps_since, self._read(trainer)
        world = trainer.world_size
        flops_per_device = self._counter(shape).total / world
        metrics = {
            "perf/step_time": seconds / steps,
            "perf/samples_per_sec": shape.samples / seconds,
            "perf/tokens_per_sec": shape.real_tokens / seconds,
            "perf/tflops_per_sec_per_device": flops_per_device / seconds / 1e12,
            "perf/peak_memory_gib": peak_memory_gib(trainer.strategy.root_device),
        }
        if self.available:
            metrics["perf/mfu"] = self.stats.mfu = flops_per_device / seconds / self.available
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def _read(self, trainer: pl.Trainer) -> tuple[BatchShape, float]:
        """The shape (summed over ranks) of the micro batches since the last read, and the seconds since it;
        adds them to the run totals and starts the next interval.

        The one host-device sync of this callback (and its one all-reduce under data parallelism).
        """
        local_F = torch.tensor(astuple(self._sizes), dtype=torch.long, device=trainer.strategy.root_device)
        if self._tokens_3 is not None:
            local_F[TOKEN_INDEX] += self._tokens_3
        total_F = trainer.strategy.reduce(local_F, reduce_op="sum") if trainer.world_size > 1 else local_F
        shape = BatchShape(*total_F.tolist())
        now = time.perf_counter()
        seconds, self._t_read = max(now - self._t_read, 1e-9), now
        self._sizes, self._tokens_3, self._steps_since = BatchShape(), None, 0
        self.stats.samples += shape.samples
        self.stats.tokens += shape.real_tokens
        self.stats.train_seconds += seconds
        return shape, seconds

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer)
        self.stats.steps = trainer.global_step
        self.stats.peak_memory_gib = peak_memory_gib(trainer.strategy.root_device)


def format_summary(
    stats: RunStats, final: dict[str, float], checkpoint: str, export: str | None, tracking: str, status: str
) -> str:
    """The few lines a run ends with."""
    secs = max(stats.train_seconds, 1e-9)
    lines = [
        f"== {status} ==",
        f"  optimizer steps   {stats.steps:,}",
        f"  samples seen      {stats.samples:,}",
        f"  tokens seen       {stats.tokens:,}",
        f"  training time     {secs:,.1f} s",
        f"  throughput        {stats.samples / secs:,.2f} samples/s, {stats.tokens / secs:,.0f} tokens/s",
    ]
    if stats.peak_memory_gib is not None:
        lines.append(f"  peak memory       {stats.peak_memory_gib:.2f} GiB")
    if stats.mfu is not None:
        lines.append(f"  MFU               {100 * stats.mfu:.1f} %")
    if final:
        lines.append("  final losses      " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
    lines.append(f"  checkpoint        {checkpoint}")
    if export:
        lines.append(f"  exported model    {export}")
    lines.append(f"  tracking          {tracking}")
    return "\n".join(lines)


class RunSummary(Callback):
    """Prints and records the end-of-run summary (rank 0), inside the training process so every launcher
    (spawned ranks included) reports it; the text lands in ``<run_dir>/summary.txt`` and in MLflow. ``sections``
    give further lines (e.g. ``DataHealth.summary``), computed by callbacks that run before this one."""

    def __init__(
        self,
        throughput: ThroughputMonitor,
        end: Any,
        export: Any,
        run_dir: Any,
        location: Any,
        sections: Sequence[Callable[[], str]] = (),
    ) -> None:
        self.throughput, self.end, self.export = throughput, end, export
        self.run_dir, self.location = run_dir, location
        self.sections = sections
        self.text = ""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        stats = self.throughput.stats
        final = {
            k.removeprefix("train/"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k in ("train/loss", "train/loss_text", "train/loss_image", "train/loss_image_tail", "val/loss")
        }
        preempted = self.end.preempted_at is not None
        status = f"PREEMPTED at step {self.end.preempted_at}: rerun the same command to resume" if preempted else "DONE"
        export_dir = getattr(self.export, "export_dir", None)
        self.text = format_summary(
            stats,
            final,
            str(self.end.last),
            str(export_dir) if export_dir else None,
            self.location(trainer.logger),
            status,
        )
        self.text = "\n".join([self.text, *filter(None, (section() for section in self.sections))])
        record_summary(self.text, stats, self.run_dir, trainer.logger, trainer.global_step)


def record_summary(text: str, stats: RunStats, run_dir: Path, logger: Any, step: int) -> None:
    """Print the summary, write ``<run_dir>/summary.txt``, and log its figures and the file to the logger."""
    print(text, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.txt").write_text(text + "\n")
    if logger is None:
        return
    summary = {"summary/samples": stats.samples, "summary/tokens": stats.tokens, "summary/seconds": stats.train_seconds}
    if stats.peak_memory_gib is not None:
        summary["summary/peak_memory_gib"] = stats.peak_memory_gib
    if stats.mfu is not None:
        summary["summary/mfu"] = stats.mfu
    logger.log_metrics(summary, step=step)
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "log_artifact") and hasattr(logger, "run_id"):
        experiment.log_artifact(logger.run_id, str(run_dir / "summary.txt"))
