"""End-to-end tests of the training app on the embedded default (tiny model, a small shapes world, CPU).

In-process runs compose the real config with Hydra's compose API and call the task; runs are 2-4 optimizer
steps of 2 micro batches of 2 samples (so gradient accumulation is always exercised).
"""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
from safetensors.torch import load_file

from vargpt.config import register_configs
from vargpt.data.shapes import ensure_shapes_world
from vargpt.training.checkpointing import PreemptedError, stage_record_path
from vargpt.training.task import train
from vargpt.training.vargpt_app import APP as VARGPT_APP  # noqa: F401  (registers the VARGPT stages' app)

CONF = Path(__file__).resolve().parents[1] / "conf"
WORLD = {"train": 400, "val": 40}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small shapes world (built once per session) with the tokenizer the runs use."""
    root = tmp_path_factory.mktemp("data")
    ensure_shapes_world(root / "shapes", size=64, train=WORLD["train"], val=WORLD["val"], seed=0, num_workers=1)
    return root


def base_overrides(data_dir: Path, log_dir: Path, steps: int = 2) -> list[str]:
    return [
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        f"data.shapes.train={WORLD['train']}",
        f"data.shapes.val={WORLD['val']}",
        "data.num_workers=0",
        "data.micro_batch_size=2",
        "stage.global_batch_size=4",
        f"stage.num_samples={4 * steps}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput_window=2",
    ]


def compose_train(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    # The app gets the job config without the hydra node (hydra.main strips it); the node is read-only.
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run(overrides: list[str]) -> tuple[object, dict[str, float]]:
    cfg = compose_train(overrides)
    metrics = train(cfg)
    return cfg, metrics


def csv_losses(run_dir: Path) -> dict[int, float]:
    """Per-step train/loss from the CSV logger (step = optimizer steps so far, 0-based in Lightning logs)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


class ModeProbe(Callback):
    """Records which sub-modules are in train mode while training (Lightning switches the whole module)."""

    seen: dict[str, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        for name in ("vargpt_gen.blocks", "language_model", "vae_local", "image_gen_projector", "vargpt_gen"):
            ModeProbe.seen[name] = model.get_submodule(name).training


class SigtermAtMicroBatch(Callback):
    """Sends this process SIGTERM after micro batch ``index`` (0-based), i.e. in the middle of an accumulation."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.completed == self.index:
            os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------------------------- the three stages
def test_three_stages_chain_with_mlflow(data_dir, tmp_path):
    """Each stage runs a few steps, starts from the previous one, exports, and is recorded in MLflow."""
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "logs"
    exports, cfgs = {}, {}
    # Stage 1 also checks train/eval modes in the loop, with activation checkpointing on.
    probe = ["+callbacks.extra.probe={_target_:test_train_run.ModeProbe}", "trainer.activation_checkpointing=true"]
    # Stage 3 also validates after each step.
    validate = ["trainer.val_every_n_steps=1", "trainer.limit_val_batches=2"]
    for stage in ("pretrain", "sft_mixed", "sft_gen"):
        extra = {"pretrain": probe, "sft_gen": validate}.get(stage, [])
        cfg, metrics = run([f"stage={stage}", *base_overrides(data_dir, log_dir), *extra])
        assert metrics["train/loss"] > 0
        run_dir = Path(cfg.paths.run_dir)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert "DONE" in (run_dir / "summary.txt").read_text()
        assert stage_record_path(log_dir, stage).is_file()
        exports[stage] = load_file(run_dir / "export" / "model.safetensors")
        cfgs[stage] = cfg
    assert ModeProbe.seen == {
        "vargpt_gen.blocks": False,  # frozen: no drop-path
        "language_model": False,
        "vae_local": False,
        "image_gen_projector": True,
        "vargpt_gen": True,  # holds the trained class embedding
    }
    # Stage 2 starts from stage 1 and leaves the generation projectors as stage 1 trained them; stage 3 leaves
    # the LLM as stage 2 trained it; the VQ-VAE never changes.
    for key in ("image_gen_projector.mlp.0.weight", "vargpt_gen.class_emb.weight"):
        assert torch.equal(exports["pretrain"][key], exports["sft_mixed"][key])
    assert torch.equal(
        exports["sft_mixed"]["language_model.lm_head.weight"], exports["sft_gen"]["language_model.lm_head.weight"]
    )
    assert not torch.equal(
        exports["sft_mixed"]["language_model.lm_head.weight"], exports["pretrain"]["language_model.lm_head.weight"]
    )
    vae = [k for k in exports["pretrain"] if k.startswith("vae_local.")]
    assert vae and all(torch.equal(exports["pretrain"][k], exports["sft_gen"][k]) for k in vae)

    client = MlflowClient(f"sqlite:///{log_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("vargpt")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pretrain", "sft_mixed", "sft_gen"}
    for stage, r in runs.items():
        assert r.info.status == "FINISHED"
        assert r.info.run_name == cfgs[stage].run_name and r.info.run_name.startswith(f"{stage}-tiny-")
        assert len(r.data.tags["git_sha"]) in (40, 7) and r.data.tags["git_dirty"] in ("true", "false")
        assert r.data.params["stage.name"] == stage
        assert float(r.data.params["stage.optimizer.lr"]) == cfgs[stage].stage.optimizer.lr
        history = client.get_metric_history(r.info.run_id, "train/loss")
        assert len(history) == 2
        for metric in ("train/grad_norm", "perf/step_time", "summary/tokens"):
            assert metric in r.data.metrics, metric
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config", "stage.txt", "summary.txt"} <= artifacts
        config_files = {a.path for a in client.list_artifacts(r.info.run_id, "config")}
        assert config_files == {"config/resolved.yaml", "config/overrides.yaml"}
    val = client.get_metric_history(runs["sft_gen"].info.run_id, "val/loss_image")
    assert len(val) == 2 and "val/loss" in runs["sft_gen"].data.metrics
    assert "val/prompt_gain_image_s0" in runs["sft_gen"].data.metrics  # validation scores prompt use per scale
    assert runs["sft_mixed"].data.tags["parent_run_id"] == runs["pretrain"].info.run_id
    assert runs["sft_gen"].data.tags["parent_run_id"] == runs["sft_mixed"].info.run_id
    assert "parent_run_id" not in runs["pretrain"].data.tags


def test_next_stage_without_previous_one_says_what_to_do(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="Run stage=pretrain first"):
        run(["stage=sft_mixed", "logger=none", *base_overrides(data_dir, tmp_path / "logs")])


# --------------------------------------------------------------------------------------------- resume
STEPS = 4
# Stage 2 from its own initial weights, CSV metrics, a periodic checkpoint after step 2. Centre crops: the data
# module's random crop of generation targets is not replayed on resume (its draws do not follow the stream
# position), which would move the losses by ~1e-4.
RESUME_RUN = [
    "stage=sft_mixed",
    "stage.init_from=null",
    "logger=csv",
    "callbacks.checkpoint.every_n_steps=2",
    "data.gen_random_crop=false",
]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """Losses of an uninterrupted 4-step run (the reference for the resume tests), and its run folder."""
    log_dir = tmp_path_factory.mktemp("straight")
    cfg, _ = run([*RESUME_RUN, *base_overrides(data_dir, log_dir, STEPS), "callbacks.checkpoint.keep_last=-1"])
    run_dir = Path(cfg.paths.run_dir)
    losses = csv_losses(run_dir)
    assert len(losses) == STEPS
    return losses, run_dir


def test_resume_gives_the_same_losses(data_dir, tmp_path, straight):
    """Resume from the checkpoint written after step 2 of 4: steps 3 and 4 reproduce the uninterrupted run
    (model, optimizer, scheduler, loop counters and data position all restored)."""
    losses, straight_dir = straight
    step2 = straight_dir / "checkpoints" / "step0000002.ckpt"
    cfg, _ = run([*RESUME_RUN, *base_overrides(data_dir, tmp_path, STEPS), f"resume={step2}"])
    resumed = csv_losses(Path(cfg.paths.run_dir))
    assert resumed.keys() == {2, 3}
    for step, loss in resumed.items():
        assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


def test_sigterm_mid_accumulation_then_resume(data_dir, tmp_path, straight):
    """SIGTERM during step 3's accumulation: step 3 completes, is saved, the run stops with PreemptedError (no
    stage record); the same command again resumes at step 4, and every loss equals the uninterrupted run's."""
    # Micro batches 0..7 make steps 1..4 (accumulation 2); after micro batch 4 step 3 is half done. The
    # resumed run starts at micro batch 6, so the same command does not signal again.
    losses_straight, _ = straight
    command = [
        *RESUME_RUN,
        *base_overrides(data_dir, tmp_path, STEPS),
        "+callbacks.extra.kill={_target_:test_train_run.SigtermAtMicroBatch,index:5}",
    ]
    handler = signal.getsignal(signal.SIGTERM)
    first = compose_train(command)
    with pytest.raises(PreemptedError, match="at step 3.*rerun the same command"):
        train(first)
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    run_dir = Path(first.paths.run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert "PREEMPTED at step 3" in (run_dir / "summary.txt").read_text()
    assert not stage_record_path(tmp_path, "sft_mixed").exists()
    losses = csv_losses(run_dir)  # the CSV logger starts a new file on resume
    second, _ = run(command)
    assert Path(second.paths.run_dir) == run_dir
    losses.update(csv_losses(run_dir))
    assert losses.keys() == losses_straight.keys()
    for step, loss in losses_straight.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert stage_record_path(tmp_path, "sft_mixed").exists()
