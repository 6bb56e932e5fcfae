"""The data's health in a run's reports: samples skipped by source and reason, and shards left out.

:class:`DataHealth` reads the data module's counts (``VARGPTDataModule.run_counts``: every rank's workers, the
training counts kept across resumes; see the data module's docstring for what is counted where) and reports them

- at the end of every validation (not the sanity check): a log line, and metrics through the Lightning logger;
- at the end of training: metrics, and a section of the run summary (``summary.txt``) through :meth:`summary`,
  which ``RunSummary`` appends, so this callback must come before it in the trainer's callbacks.

Metrics (cumulative counts; MLflow keys allow ``/``): ``data/<split>/seen/<source>`` (samples processed or
skipped), ``data/<split>/skipped/<source>/<reason>`` and ``data/<split>/bad_rate/<source>``, with ``<split>``
``train`` (since the run started) or ``val`` (the last validation pass).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.stream_sources import TRAIN, VAL, StreamCounts

log = logging.getLogger(__name__)

SPLIT_NAMES = {TRAIN: "training", VAL: "validation"}


def health_metrics(split: str, counts: StreamCounts) -> dict[str, float]:
    """The metrics of one split's counts (see the module docstring)."""
    metrics: dict[str, float] = {}
    for source, seen in sorted(counts.seen.items()):
        metrics[f"data/{split}/seen/{source}"] = seen
        metrics[f"data/{split}/bad_rate/{source}"] = counts.bad(source) / seen
        for reason, n in sorted(counts.skipped.get(source, {}).items()):
            metrics[f"data/{split}/skipped/{source}/{reason}"] = n
    return metrics


def describe_counts(counts: StreamCounts) -> list[str]:
    """One line per source: ``<source>: <skipped> of <seen> skipped (<rate>): <reason> <n>, ...``."""
    lines = []
    for source, seen in sorted(counts.seen.items()):
        bad = counts.bad(source)
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(counts.skipped.get(source, {}).items()))
        lines.append(f"{source}: {bad:,} of {seen:,} skipped ({bad / seen:.2%})" + (f": {reasons}" if reasons else ""))
    return lines


def summary_section(train: StreamCounts, val: StreamCounts, missing: dict[str, list[str]]) -> str:
    """The run summary's lines on the data, aligned with ``format_summary``'s."""
    lines = []
    for split, counts in ((TRAIN, train), (VAL, val)):
        label = f"skipped, {split}"
        rows = describe_counts(counts) or ["no sample read"]
        lines += [f"  {label:<18}{rows[0]}", *(f"  {'':<18}{row}" for row in rows[1:])]
    for source, paths in sorted(missing.items()):
        lines.append(f"  {'missing shards':<18}{source}: {len(paths)} left out (data.allow_missing_shards)")
    return "\n".join(lines)


class DataHealth(Callback):
    """Reports skipped samples and missing shards (see the module docstring); a no-op without the VARGPT data
    module."""

    def __init__(self) -> None:
        self.text = ""

    def summary(self) -> str:
        """The run summary's data section (empty until training ends)."""
        return self.text

    @staticmethod
    def _counts(trainer: pl.Trainer) -> tuple[VARGPTDataModule, StreamCounts, StreamCounts] | None:
        """The data module and its all-rank training and validation counts (a collective: every rank calls)."""
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, VARGPTDataModule):
            return None
        return datamodule, datamodule.run_counts(TRAIN), datamodule.run_counts(VAL)

    @staticmethod
    def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero and trainer.logger is not None and metrics:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (found := self._counts(trainer)) is None:
            return
        _, train, val = found
        if trainer.is_global_zero:
            for split, counts in ((TRAIN, train), (VAL, val)):
                described = "; ".join(describe_counts(counts)) or "no sample read"
                log.info("step %d, %s data: %s", trainer.global_step, SPLIT_NAMES[split], described)
        self._log_metrics(trainer, {**health_metrics(TRAIN, train), **health_metrics(VAL, val)})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (found := self._counts(trainer)) is None:
            return
        datamodule, train, val = found
        self.text = summary_section(train, val, datamodule.missing_shards())
        self._log_metrics(trainer, health_metrics(TRAIN, train))
