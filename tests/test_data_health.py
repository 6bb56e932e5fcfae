"""Skipped samples reported at validation ends and in the run summary (vargpt.training.data_health)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import test_data_pipeline as pipeline
import torch
from fixtures.data import tiny_world
from lightning.pytorch.loggers import Logger

from vargpt.data.config import SourceConfig
from vargpt.data.stream_sources import StreamCounts
from vargpt.training.callbacks import RunStats, RunSummary
from vargpt.training.data_health import DataHealth, summary_section


class MetricsRecorder(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class Still(pl.LightningModule):
    """Trains nothing: the batches only have to flow."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_skipped_samples_reach_the_validation_logs_the_logger_and_the_summary(tmp_path, caplog):
    n, bad = pipeline.corrupt_copy(tiny_world() / "val" / "vqa", tmp_path / "vqa", every=4, shard_samples=8)
    vqa = {"vqa": SourceConfig(str(tmp_path / "vqa"))}
    dm = pipeline.make_dm(train_sources=vqa, val_sources=vqa, bad_sample_min_samples=10**6)
    logger = MetricsRecorder()
    health = DataHealth()
    end = SimpleNamespace(preempted_at=None, last=tmp_path / "last.ckpt")
    summary = RunSummary(SimpleNamespace(stats=RunStats()), end, None, tmp_path, lambda _: "here", [health.summary])
    trainer = pl.Trainer(
        max_steps=8,
        val_check_interval=4,
        num_sanity_val_steps=1,  # the sanity check's partial pass is not reported
        accelerator="cpu",
        logger=logger,
        callbacks=[health, summary],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level("INFO", logger="vargpt.training.data_health"):
        trainer.fit(Still(), datamodule=dm)

    train = dm.run_counts("train")
    assert train.skipped["vqa"]["non_utf8"] > 0
    val_line = f"vqa: {bad} of {n} skipped ({bad / n:.2%}): non_utf8 {bad}"
    reports = [r.getMessage() for r in caplog.records if "validation data" in r.getMessage()]
    assert reports == [f"step 4, validation data: {val_line}", f"step 8, validation data: {val_line}"]
    at_validation = [(step, m) for step, m in logger.logged if "data/val/seen/vqa" in m]
    assert [step for step, _ in at_validation] == [4, 8]
    assert all(m["data/val/skipped/vqa/non_utf8"] == bad and m["data/val/seen/vqa"] == n for _, m in at_validation)
    final = [
        entry for entry in logger.logged if "data/val/seen/vqa" not in entry[1] and "data/train/seen/vqa" in entry[1]
    ]
    assert final[-1] == (
        8,
        {
            "data/train/seen/vqa": train.seen["vqa"],
            "data/train/bad_rate/vqa": train.bad("vqa") / train.seen["vqa"],
            "data/train/skipped/vqa/non_utf8": train.skipped["vqa"]["non_utf8"],
        },
    )
    rate = train.bad("vqa") / train.seen["vqa"]
    section = (
        f"  skipped, train    vqa: {train.bad('vqa')} of {train.seen['vqa']} skipped ({rate:.2%}): non_utf8 "
        f"{train.bad('vqa')}\n  skipped, val      {val_line}"
    )
    text = (Path(tmp_path) / "summary.txt").read_text()
    assert text.endswith(f"  tracking          here\n{section}\n") and summary.text.endswith(section)


def test_the_summary_section_lists_missing_shards():
    counts = StreamCounts({"a": 10, "b": 4}, {"a": {"read_error": 1, "image_unreadable": 2}})
    assert summary_section(counts, StreamCounts(), {"train/a": ["x/s-1.tar", "x/s-2.tar"]}) == (
        "  skipped, train    a: 3 of 10 skipped (30.00%): image_unreadable 2, read_error 1\n"
        "                    b: 0 of 4 skipped (0.00%)\n"
        "  skipped, val      no sample read\n"
        "  missing shards    train/a: 2 left out (data.allow_missing_shards)"
    )
