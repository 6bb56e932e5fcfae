"""Multi-process training on CPU (gloo): DDP with 2 processes, and FSDP2 (ModelParallelStrategy + fully_shard)
with 2 processes, including its sharded checkpoints as the next stage's start, preemption and resume.

Slow (each run starts 2 processes of the whole app): ``pytest -m slow tests/test_train_dist.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_run import base_overrides, data_dir  # noqa: F401  (the session's shapes world fixture)
from test_train_sweep import train_cli

pytestmark = pytest.mark.slow

CPU2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted((log_dir / "runs").iterdir())


def test_ddp_two_processes(data_dir, tmp_path):  # noqa: F811
    log_dir = tmp_path / "logs"
    validate = ["trainer.val_every_n_steps=1", "trainer.limit_val_batches=2"]
    result = train_cli(
        "stage=sft_mixed", "stage.init_from=null", "trainer=ddp", *CPU2, *base_overrides(data_dir, log_dir), *validate
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "micro batch 2 x 2 ranks x 1 accumulation" in result.stdout + result.stderr
    (run_dir,) = run_dirs(log_dir)  # one folder for both ranks
    summary = (run_dir / "summary.txt").read_text()
    assert "DONE" in summary and "samples seen      8" in summary
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_fsdp2_two_processes_stages_preemption_and_resume(data_dir, tmp_path):  # noqa: F811
    log_dir = tmp_path / "logs"
    common = ["trainer=fsdp", *CPU2, "logger=csv"]
    first = train_cli("stage=pretrain", *common, *base_overrides(data_dir, log_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    (pretrain_dir,) = run_dirs(log_dir)
    last = pretrain_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    assert (pretrain_dir / "export" / "model.safetensors").is_file()  # gathered for the export

    # Stage 2 starts from stage 1's sharded checkpoint; SIGTERM on both ranks after the first step.
    stage2 = [
        "stage=sft_mixed",
        *common,
        *base_overrides(data_dir, log_dir, steps=3),
        "+callbacks.extra.kill={_target_:test_train_run.SigtermAtMicroBatch,index:0}",
    ]
    preempted = train_cli(*stage2)
    assert preempted.returncode == 143, preempted.stderr[-3000:]
    assert f"initialising the model from {last}" in preempted.stdout
    stage2_dir = next(d for d in run_dirs(log_dir) if d.name.startswith("sft_mixed"))
    assert "PREEMPTED at step 1" in (stage2_dir / "summary.txt").read_text()
    meta = torch.load(stage2_dir / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 1

    resumed = train_cli(*stage2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    summary = (stage2_dir / "summary.txt").read_text()
    assert "DONE" in summary and "optimizer steps   3" in summary


def test_ddp_fork_sweep(data_dir, tmp_path):  # noqa: F811
    """A local -m sweep with 2 ranks per job: each job forks its own ranks, nothing re-runs the sweep."""
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "logs"
    args = ["-m", "stage=sft_mixed", "stage.init_from=null", "trainer=ddp_fork", *CPU2, "stage.optimizer.lr=1e-3,2e-3"]
    result = train_cli(*args, *base_overrides(data_dir, log_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{log_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vargpt").experiment_id])
    assert sorted(r.data.params["stage.optimizer.lr"] for r in runs) == ["0.001", "0.002"]
    assert all(r.info.status == "FINISHED" for r in runs) and len(run_dirs(log_dir)) == 2
