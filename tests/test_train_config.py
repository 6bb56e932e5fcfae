"""The training app's config: every stage and experiment composes and validates; mistakes fail at compose time
naming the key and the allowed values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from vargpt.config import register_configs, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
STAGES = sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))  # VARGPT's three and the stage-0 recipes
VARGPT_STAGES = {"pretrain": None, "sft_mixed": "pretrain", "sft_gen": "sft_mixed"}  # stage -> previous stage
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", [*EXPERIMENTS, None])
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_and_experiment_composes(stage, experiment):
    cfg = compose_cfg(f"stage={stage}", f"experiment={experiment}" if experiment else "~experiment")
    cfg.run_name = "test"  # the hash needs Hydra's runtime; everything else must resolve
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.stage.name == stage
    if stage in VARGPT_STAGES:
        previous = VARGPT_STAGES[stage]
        assert cfg.stage.previous_stage == previous
        assert cfg.stage.init_from == ("previous" if previous else None)


def test_stage_numbers_follow_the_references():
    """Stage 3 = the released config, stages 1-2 = LLaVA-1.5's (VARGPT-REFERENCE.md 5.3), without the demo."""
    s1, s2, s3 = (compose_cfg(f"stage={s}", "~experiment").stage for s in ("pretrain", "sft_mixed", "sft_gen"))
    assert (s1.optimizer.lr, s1.global_batch_size, s1.scheduler.warmup_ratio) == (1e-3, 256, 0.03)
    assert (s2.optimizer.lr, s2.global_batch_size, s2.scheduler.warmup_ratio) == (2e-5, 128, 0.03)
    assert (s3.optimizer.lr, s3.global_batch_size, s3.scheduler.warmup_ratio, s3.num_samples) == (
        5e-5,
        128,
        0.1,
        4_200_000,
    )
    for s in (s1, s2, s3):
        assert s.optimizer.weight_decay == 0.0 and s.grad_clip == 1.0 and tuple(s.optimizer.betas) == (0.9, 0.999)


def test_vargpt_v1_is_the_papers_setup():
    cfg = compose_cfg("experiment=vargpt_v1", "stage=sft_gen")
    assert cfg.model.name == "vargpt_llava_7b" and cfg.trainer.strategy.value == "fsdp"
    assert cfg.trainer.devices * cfg.data.micro_batch_size * 2 == cfg.stage.global_batch_size  # 8 x 8 x 2 = 128
    assert cfg.trainer.precision == "bf16-mixed"


def test_shapes_mix_per_stage():
    weights = {s: compose_cfg(f"stage={s}").data.train_sources for s in VARGPT_STAGES}
    assert {k for k, v in weights["pretrain"].items() if v.weight != 0} == {"shapes_t2i"}
    assert {k for k, v in weights["sft_gen"].items() if v.weight != 0} == {"shapes_t2i"}
    assert all(v.weight is None for v in weights["sft_mixed"].values())
    # Real data configs keep their own sources (the shapes mix is not applied to them).
    real = compose_cfg("stage=pretrain", "data=stage1_imagenet_instruct").data.train_sources
    assert set(real) == {"imagenet_instruct_class"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stage.optimizer.lrr=1e-4", ["stage.optimizer.lrr", "OptimizerConfig"]),
        ("stage.scheduler.name=cosin", ["stage.scheduler.name", "cosine, linear, constant"]),
        ("trainer.strategy=fsdp1", ["trainer.strategy", "auto, ddp, ddp_fork, fsdp"]),
        ("stage=stage3", ["stage/stage3", "pretrain", "sft_gen", "sft_mixed"]),
        ("trainer=tpu", ["trainer/tpu", "cpu", "ddp", "fsdp", "gpu"]),
        ("stage.global_batch_size=many", ["stage.global_batch_size", "many"]),
        ("logger.backend=wandb", ["logger.backend", "mlflow, csv, none"]),
        ("trainer.compile.mode=fast", ["trainer.compile.mode", "default, reduce-overhead, max-autotune"]),
        ("trainer.compile.enabled=maybe", ["trainer.compile.enabled", "maybe"]),
        ("trainer.compile.backend=eager", ["trainer.compile.backend", "CompileConfig"]),
    ],
)
def test_bad_override_names_key_and_allowed_values(override, expected):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(override)
    message = f"{info.value}\n{info.value.__cause__}"
    for text in expected:
        assert text in message, (text, message)


def test_validation_catches_cross_field_mistakes():
    cfg = compose_cfg("stage=sft_mixed")
    cfg.run_name = "test"
    cfg.stage.trainable = {"language_model": False, "multi_modal_projector": False}
    with pytest.raises(ValueError, match="trains nothing"):
        validate(cfg)
    cfg = compose_cfg("stage=sft_mixed", "stage.previous_stage=stage1")
    with pytest.raises(ValueError, match="stage.previous_stage='stage1'"):
        validate(cfg)
    cfg = compose_cfg("stage=sft_gen", "data.gen_resize_ratio=0.5")
    with pytest.raises(ValueError, match="data.gen_resize_ratio"):
        validate(cfg)
    cfg = compose_cfg("+stage.learning_rate=1e-4")  # '+' gets past Hydra's check, not ours
    with pytest.raises(ValueError, match=r"\['stage.learning_rate'\]"):
        validate(cfg)


@pytest.mark.parametrize(
    "override",
    [
        "data.micro_batch_size=0",
        "data.micro_batch_size=-4",
        "data.val_micro_batch_size=0",
        "data.samples_per_epoch=0",
        "data.cutoff_len=0",
        "stage.num_samples=0",
        "stage.global_batch_size=-1",
        "trainer.num_nodes=0",
    ],
)
def test_counts_must_be_positive(override):
    """Zero or negative counts fail at validation naming the key (micro_batch_size=0 was a late ZeroDivisionError)."""
    key, value = override.split("=")
    cfg = compose_cfg("stage=pretrain", override)
    with pytest.raises(ValueError, match=f"^{key} must be positive, got {value}$"):
        validate(cfg)


def test_recipe_micro_batch_must_be_positive():
    cfg = compose_cfg("stage=world_lm", "~experiment", "stage.recipe.micro_batch_size=0")
    with pytest.raises(ValueError, match="^stage.recipe.micro_batch_size must be positive, got 0$"):
        validate(cfg)


def _has_submitit_plugin() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_submitit_plugin(), reason="needs pip install hydra-submitit-launcher")
def test_slurm_launcher_preset_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 8


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["stage.optimizer.lrr=1e-4"],
            "stage.optimizer has ['_partial_', '_target_', 'betas', 'eps', 'lr', 'weight_decay']",
        ),
        (["-m", "data.micro_batchsize=2,4"], "'data.micro_batchsize'"),
        (["model.var.dept=2"], "model.var has"),
        (["stage=sft_gen", "experiment=vargpt_v1", "stage.trainable.vargpt_gen=false", "--cfg", "job"], None),
        (["hydra.verbose=true", "+stage.extra=1", "data.train_sources.mine.weight=2"], None),
    ],
)
def test_unknown_override_key_lists_the_keys_that_exist(args, expected):
    from vargpt.config import unknown_override_key

    message = unknown_override_key(args)
    assert message == expected if expected is None else expected in message
