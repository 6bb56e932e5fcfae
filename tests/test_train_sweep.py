"""The command line: a -m sweep (each job its own MLflow run, a failing job does not stop the others), the
compare_runs notebook executed against that sweep, and the message of a misspelt override."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from test_train_run import base_overrides, data_dir  # noqa: F401  (the session's shapes world fixture)

REPO = Path(__file__).resolve().parents[1]


def train_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # tests/ on the path: test callbacks are given by import path (callbacks.extra).
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "src/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def sweep(data_dir, tmp_path_factory):  # noqa: F811
    """4 jobs: two learning rates x two global batches, one of which (3) no micro batch of 2 divides."""
    log_dir = tmp_path_factory.mktemp("sweep")
    result = train_cli(
        "-m",
        "stage.optimizer.lr=1e-3,3e-3",
        "stage.global_batch_size=3,4",
        *[o for o in base_overrides(data_dir, log_dir) if not o.startswith("stage.global_batch_size")],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return log_dir, result


def test_sweep_jobs_are_runs_and_failures_do_not_stop_it(sweep):
    log_dir, result = sweep
    client = MlflowClient(f"sqlite:///{log_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("vargpt")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    assert len({r.data.tags["sweep"] for r in runs}) == 1
    status = {
        (r.data.params["stage.optimizer.lr"], r.data.params["stage.global_batch_size"]): r.info.status for r in runs
    }
    assert status == {
        ("0.001", "3"): "FAILED",
        ("0.003", "3"): "FAILED",
        ("0.001", "4"): "FINISHED",
        ("0.003", "4"): "FINISHED",
    }
    assert len({r.info.run_name for r in runs}) == 4  # names differ by the hash of each job's overrides
    assert "not a multiple of micro_batch_size" in result.stderr + result.stdout
    assert (log_dir / "multirun").is_dir()


def test_compare_runs_notebook_on_the_sweep(sweep):
    log_dir, _ = sweep
    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "commit it without outputs"
    os.environ.update(VARGPT_LOG_DIR=str(log_dir), VARGPT_EXPERIMENT="vargpt", VARGPT_SWEEP="latest")
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
        ).execute()
    finally:
        for key in ("VARGPT_LOG_DIR", "VARGPT_EXPERIMENT", "VARGPT_SWEEP"):
            os.environ.pop(key)
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "4 runs of sweep" in text
    assert "stage.optimizer.lr" in text and "stage.global_batch_size" in text  # the changed params
    assert (
        sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs) >= 2
    )


def test_cli_misspelt_override_lists_the_keys():
    result = train_cli("stage.optimizer.lrr=1e-4", timeout=120)
    assert result.returncode != 0
    assert "unknown key 'stage.optimizer.lrr'" in result.stderr
    assert "'lr'" in result.stderr and "'weight_decay'" in result.stderr
