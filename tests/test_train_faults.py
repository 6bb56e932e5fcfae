"""Faults of the training app end in a clear message or a recorded state, never in a silent success: a crash
after the final checkpoint, preemption, a resume checkpoint holding code, a bad count in the config.

Runs are the tiny in-process runs of test_train_run (2 optimizer steps of 2 micro batches); one goes through the
command line, for its exit status.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from test_backbones import recipe_overrides
from test_train_run import base_overrides, compose_train, data_dir  # noqa: F401 (fixture)

from vargpt.backbones.app import APP as RECIPE_APP  # noqa: F401  (registers the stage-0 recipes' app)
from vargpt.checkpoint.io import UnsafeCheckpointError
from vargpt.training import checkpointing as ckpt
from vargpt.training.task import train
from vargpt.training.vargpt_app import APP as VARGPT_APP  # noqa: F401  (registers the VARGPT stages' app)

REPO = Path(__file__).resolve().parents[1]


def mlflow_status(log_dir: Path, run_id: str) -> str:
    return MlflowClient(f"sqlite:///{log_dir.resolve()}/mlflow.db").get_run(run_id).info.status


# --------------------------------------------------------------------------------------------- crash before the export
def test_rerun_of_a_complete_run_finishes_what_a_crash_left_out(data_dir, tmp_path, caplog):  # noqa: F811
    """A crash between the final checkpoint and the end of the run (export, stage record, summary and the MLflow
    status lost): the same command again trains nothing, writes them all from last.ckpt, and says so."""
    log_dir = tmp_path / "logs"
    command = ["stage=pretrain", *base_overrides(data_dir, log_dir)]
    cfg = compose_train(command)
    train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    exported = load_file(run_dir / "export" / "model.safetensors")
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    shutil.rmtree(run_dir / "export")
    ckpt.stage_record_path(log_dir, "pretrain").unlink()
    (run_dir / "summary.txt").unlink()
    MlflowClient(f"sqlite:///{log_dir.resolve()}/mlflow.db").update_run(run_id, status="RUNNING")

    with caplog.at_level(logging.WARNING, logger="vargpt.training.task"):
        train(compose_train(command))
    assert "training is complete (2 of 2 optimizer steps" in caplog.text
    assert "finishes what the interrupted end left out: export, stage record, summary" in caplog.text
    again = load_file(run_dir / "export" / "model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    record = ckpt.read_stage_record(log_dir, "pretrain")
    assert record.run_name == cfg.run_name and record.global_step == 2
    assert record.checkpoint == str(run_dir / "checkpoints" / "last.ckpt")
    assert record.export_dir == str(run_dir / "export") and record.mlflow_run_id == run_id
    summary = (run_dir / "summary.txt").read_text()
    assert summary.startswith("== DONE (training was complete") and "optimizer steps   2" in summary
    assert "peak memory" not in summary  # not measured by a rerun that trains nothing
    assert mlflow_status(log_dir, run_id) == "FINISHED"
    # Once more: nothing is missing now, so nothing is written (the record keeps its time).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vargpt.training.task"):
        train(compose_train(command))
    assert "and the run finished: nothing to do" in caplog.text
    assert ckpt.read_stage_record(log_dir, "pretrain") == record


def test_rerun_of_a_complete_recipe_finishes_its_export(data_dir, tmp_path, caplog):  # noqa: F811
    """The stage-0 recipe path: the same recovery (validation, export, stage record, summary)."""
    log_dir = tmp_path / "logs"
    command = recipe_overrides(data_dir, log_dir, "world_lm")
    cfg = compose_train(command)
    train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    shutil.rmtree(run_dir / "export")
    ckpt.stage_record_path(log_dir, "world_lm").unlink()
    with caplog.at_level(logging.WARNING, logger="vargpt.backbones.app"):
        metrics = train(compose_train(command))
    assert "training is complete (2 of 2 optimizer steps" in caplog.text
    assert "val/loss" in metrics
    record = ckpt.read_stage_record(log_dir, "world_lm")
    assert record.run_name == cfg.run_name and record.global_step == 2
    assert (run_dir / "export" / "language_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- preemption
def test_preempted_stage_exits_143_and_the_next_stage_refuses(data_dir, tmp_path):  # noqa: F811
    """An older pretrain run finished; a newer one is preempted: src/train.py exits 143, the stage record still
    names the older run, MLflow says KILLED, and stage 2 refuses to start from the older run, saying which run
    is unfinished and how to finish it."""
    log_dir = tmp_path / "logs"
    older = compose_train(["stage=pretrain", "logger=none", *base_overrides(data_dir, log_dir)])
    train(older)
    newer = ["stage=pretrain", *base_overrides(data_dir, log_dir), "stage.optimizer.lr=1e-3"]
    kill = "+callbacks.extra.kill={_target_:test_train_run.SigtermAtMicroBatch,index:1}"  # after step 1 of 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "src/train.py", *newer, kill], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == ckpt.PREEMPTED_EXIT_CODE == 143, done.stderr[-3000:]
    assert "preempted (SIGTERM) at step 1" in done.stdout  # Hydra logs to stdout

    on_disk = json.loads(ckpt.stage_record_path(log_dir, "pretrain").read_text())
    assert on_disk["run_name"] == older.run_name  # never a record of the preempted run
    run_dir, state = ckpt.newest_run(log_dir, "pretrain")
    assert state.state == "preempted" and state.global_step == 1 and run_dir.name != older.run_name
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert mlflow_status(log_dir, run_id) == "KILLED"

    with pytest.raises(ckpt.UnfinishedStageError) as info:
        train(compose_train(["stage=sft_mixed", "logger=none", *base_overrides(data_dir, log_dir)]))
    message = str(info.value)
    assert f"the newest 'pretrain' run, {run_dir.name} ({run_dir}), is unfinished: preempted, at step 1 of 2" in message
    assert "rerunning the same command" in message and "stage.optimizer.lr=1e-3" in message and kill in message
    assert on_disk["checkpoint"] in message  # the older run's checkpoint, for stage.init_from=PATH


# --------------------------------------------------------------------------------------------- resume safety
class Payload:
    """Unpickling this creates ``path``: what code in a checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("how", ["auto", "path"])
def test_resume_never_runs_code_in_a_checkpoint(data_dir, tmp_path, monkeypatch, how):  # noqa: F811
    """resume=auto on a planted last.ckpt and resume=PATH are read with weights_only=True even when the
    environment turns torch's default off: nothing runs, and the error names the file."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code_ran"
    log_dir = tmp_path / "logs"
    planted = tmp_path / "evil.ckpt"
    cfg = compose_train(["stage=pretrain", "logger=none", *base_overrides(data_dir, log_dir), f"resume={planted}"])
    if how == "auto":
        cfg = compose_train(["stage=pretrain", "logger=none", *base_overrides(data_dir, log_dir)])
        planted = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1, "state_dict": {}, "loops": Payload(marker)}, planted)
    with pytest.raises(UnsafeCheckpointError, match=f"^{re.escape(str(planted))}: holds Python code .* will not be"):
        train(cfg)
    assert not marker.exists()


def test_lightnings_own_read_is_safe_too(tmp_path, monkeypatch):
    """The checkpoint IO the Trainer reads resume checkpoints with ignores Lightning's and the environment's
    weights_only=False."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, path = tmp_path / "code_ran", tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "loops": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="will not be loaded"):
        ckpt.SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("value", [0, -4])
def test_bad_micro_batch_fails_before_anything_and_leaves_no_run_folder(data_dir, tmp_path, value):  # noqa: F811
    """data.micro_batch_size=0 used to fail late with a ZeroDivisionError; the folder Hydra made for the run
    (its config copy and log) is removed."""
    cfg = compose_train(["stage=pretrain", "logger=none", *base_overrides(data_dir, tmp_path / "logs")])
    cfg.data.micro_batch_size = value
    run_dir = Path(cfg.paths.run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / f"{HydraConfig.get().job.name}.log").write_text("")
    with pytest.raises(ValueError, match=f"^data.micro_batch_size must be positive, got {value}$"):
        train(cfg)
    assert not run_dir.exists()
