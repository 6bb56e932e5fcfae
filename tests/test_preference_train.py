"""``stage=dpo_gen`` end to end on the hand-written release-format fixture (tests/fixtures/preference): the
converter's shards, the preference module with a frozen-copy reference, the tiny model from the embedded
backbones; learning raises the reward accuracy, and a resumed run reproduces the uninterrupted one's losses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_train_run import compose_train, csv_losses
from test_train_sweep import train_cli

from vargpt.data.dataset_formats import PreferenceConverter
from vargpt.data.datasets_to_shards import ConvertOptions, run_conversion
from vargpt.training.task import train
from vargpt.training.vargpt_app import APP as VARGPT_APP  # noqa: F401  (registers the VARGPT stages' app)

FIXTURE = Path(__file__).parent / "fixtures" / "preference"


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preference")
    run_conversion(PreferenceConverter(FIXTURE / "pairs.json", FIXTURE / "images", "pairs"), ConvertOptions(root / "p"))
    return root


def dpo_overrides(root: Path, log_dir: Path, steps: int) -> list[str]:
    """A frozen-copy DPO run of ``steps`` optimizer steps of 2 micro batches of 1 pair, from the backbones."""
    return [
        "stage=dpo_gen",
        "stage.init_from=null",
        "stage.preference.reference=frozen_copy",
        "stage.optimizer.lr=1e-3",
        "stage.scheduler.warmup_ratio=0",
        "stage.global_batch_size=2",
        f"stage.num_samples={2 * steps}",
        f"paths.log_dir={log_dir}",
        f"data.root={root}",
        "data.train_sources.preference.path=p",
        "data.num_workers=0",
        "data.micro_batch_size=1",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput_window=2",
        "callbacks.checkpoint.every_n_steps=2",
        "callbacks.checkpoint.keep_last=-1",
    ]


def csv_metric(run_dir: Path, name: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def test_dpo_learns_the_fixture_preferences(pairs_root, tmp_path):
    cfg = compose_train(dpo_overrides(pairs_root, tmp_path, steps=12))
    train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    losses = csv_losses(run_dir)
    accuracies = csv_metric(run_dir, "train/rewards/accuracies")
    # The first step's policy is its reference: the DPO loss of any pair is log 2.
    assert losses[0] == pytest.approx(0.6931472, abs=1e-5)
    late = [accuracies[s] for s in sorted(accuracies)[-6:]]
    assert sum(late) / len(late) > 0.5, accuracies
    assert (run_dir / "export" / "model_config.yaml").is_file()


def test_dpo_resume_gives_the_same_losses(pairs_root, tmp_path):
    straight = compose_train(dpo_overrides(pairs_root, tmp_path / "a", steps=4))
    train(straight)
    losses = csv_losses(Path(straight.paths.run_dir))
    step2 = Path(straight.paths.run_dir) / "checkpoints" / "step0000002.ckpt"
    resumed_cfg = compose_train([*dpo_overrides(pairs_root, tmp_path / "b", steps=4), f"resume={step2}"])
    train(resumed_cfg)
    resumed = csv_losses(Path(resumed_cfg.paths.run_dir))
    assert resumed.keys() == {2, 3}
    for step, loss in resumed.items():
        assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


def test_a_preference_stage_refuses_conversation_data(pairs_root, tmp_path):
    cfg = compose_train([*dpo_overrides(pairs_root, tmp_path, steps=1), "data.pairs=false"])
    with pytest.raises(ValueError, match="needs pair data"):
        train(cfg)


@pytest.mark.slow
def test_dpo_under_fsdp2_two_processes(pairs_root, tmp_path):
    """The preference step under FSDP2 (2 gloo ranks): ``sequence_logps`` gathers the sharded root's parameters as
    ``forward`` does, and the first step's policy is its frozen copy (log 2)."""
    cpu2 = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    result = train_cli(*dpo_overrides(pairs_root, tmp_path, steps=2), *cpu2)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = sorted((tmp_path / "runs").iterdir())
    losses = csv_losses(run_dir)
    assert sorted(losses) == [0, 1]
    assert losses[0] == pytest.approx(0.6931472, abs=1e-5)
