"""Experiment tracking with MLflow: one local SQLite store per run root, explicit run names, full provenance.

Everything a run writes lives under ``paths.log_dir``: ``mlflow.db`` (the tracking store; MLflow 3.17's
default ``./mlruns`` file store raises), ``mlartifacts/`` (artifacts), ``runs/<run_name>/`` (checkpoints,
export, summary). So ``paths.log_dir=/some/dir`` moves all of it, and ``make mlflow-ui`` serves it.

Each run gets: a name set explicitly (stage-model-hash of the overrides; seeding before the logger exists
would otherwise give every run the same random name), tags (stage, model, git SHA and dirty flag, the
previous stage's run id, run folder, sweep folder), the whole resolved config flattened into params, and the
resolved config and the command-line overrides as artifacts. A resumed run continues the same MLflow run (its
id is kept in the run folder).
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from filelock import FileLock
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
# MLflow's limit on a param value; longer values (long lists) are cut, the full config is an artifact.
MAX_PARAM_CHARS = 6000


def tracking_uri(log_dir: str | Path) -> str:
    """``sqlite:///<absolute log_dir>/mlflow.db``: the tracking URI of a run root."""
    return f"sqlite:///{Path(log_dir).resolve() / 'mlflow.db'}"


def git_state(repo_dir: str | Path) -> tuple[str, bool]:
    """(commit SHA, dirty flag) of the checkout, ("unknown", False) outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return sha, bool(status.strip())


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys with string values (lists kept as one value), as MLflow params want."""
    out: dict[str, str] = {}
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = str(cfg)[:MAX_PARAM_CHARS]
    return out


def saved_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    return json.loads(path.read_text())["run_id"] if path.exists() else None


def build_logger(cfg: DictConfig, run_dir: Path, tags: dict[str, str], resume_run_id: str | None) -> Logger | None:
    """The Lightning logger of ``logger.backend``; MLflow continues ``resume_run_id`` when given."""
    backend = cfg.logger.backend.value if hasattr(cfg.logger.backend, "value") else str(cfg.logger.backend)
    if backend == "none":
        return None
    if backend == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    log_dir = Path(cfg.paths.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    # Runs started together on one run root (the backbone recipes side by side) would race to create the
    # SQLite tables (the client does on construction) and the experiment (on first access): both hold a lock.
    with FileLock(str(log_dir / ".mlflow.lock")):
        logger = MLFlowLogger(
            experiment_name=cfg.logger.experiment_name,
            run_name=cfg.run_name,
            tracking_uri=cfg.logger.tracking_uri or tracking_uri(log_dir),
            tags={**tags, **dict(cfg.logger.tags)},
            artifact_location=(log_dir / "mlartifacts").as_uri(),
            run_id=resume_run_id,
        )
        _ = logger.experiment
    return logger


def run_tags(cfg: DictConfig, repo_dir: Path, parent_run_id: str | None, sweep_dir: str | None) -> dict[str, str]:
    """Provenance tags of a run."""
    sha, dirty = git_state(repo_dir)
    tags = {
        "stage": cfg.stage.name,
        "model": cfg.model.name,
        "git_sha": sha,
        "git_dirty": str(dirty).lower(),
        "run_dir": str(Path(cfg.paths.run_dir).resolve()),
    }
    if parent_run_id:
        tags["parent_run_id"] = parent_run_id
    if sweep_dir:
        tags["sweep"] = sweep_dir
    return tags


def record_run(logger: Logger | None, cfg: DictConfig, overrides: list[str], run_dir: Path, new_run: bool) -> None:
    """Params and config artifacts of a new MLflow run, and its id in the run folder (rank 0 only)."""
    if not isinstance(logger, MLFlowLogger):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": logger.run_id, "tracking_uri": logger._tracking_uri}))
    if not new_run:
        return  # params are immutable in MLflow: a resumed run keeps the ones it started with
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    logger.log_hyperparams(flatten(resolved))
    config_dir = run_dir / "config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (config_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    logger.experiment.log_artifacts(logger.run_id, str(config_dir), artifact_path="config")


def log_artifact_text(logger: Logger | None, text: str, name: str, run_dir: Path) -> None:
    """Write ``text`` into the run folder and attach it to the MLflow run."""
    path = run_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path))


def run_location(logger: Logger | None) -> str:
    """Where to find the run: MLflow URI + ids, or the CSV folder."""
    if isinstance(logger, MLFlowLogger):
        return f"{logger._tracking_uri} experiment {logger.experiment_id} run {logger.run_id}"
    if isinstance(logger, CSVLogger):
        return logger.log_dir
    return "not tracked (logger.backend=none)"
