"""Unit tests of the training building blocks: stage policy, optimizer groups and schedule, batch arithmetic,
tracking helpers, resume resolution and the SIGTERM handler (the FLOP count: test_training_flops.py). No Trainer
runs here."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vargpt.checkpoint.io import CorruptCheckpointError
from vargpt.model import SpecialTokenIds, build_vargpt, load_model_config
from vargpt.training import checkpointing as ckpt
from vargpt.training import tracking
from vargpt.training.optim import accumulation_steps, lr_factor, optimizer_steps, param_groups
from vargpt.training.stage import apply_stage

CONF = Path(__file__).resolve().parents[1] / "conf"
IDS = SpecialTokenIds(image=4, pad=3, gen_start=5, gen_end=6, gen_pad=7, eos=2, bos=1)


@pytest.fixture(scope="module")
def tiny():
    return build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), IDS)


def stage_trainable(name: str) -> dict:
    return dict(OmegaConf.load(CONF / "stage" / f"{name}.yaml").stage.trainable)


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# --------------------------------------------------------------------------------------------- stage policy
EXPECTED = {
    # VARGPT-REFERENCE.md 5.1 ("effectively trainable"): the released code's stage 2 freezes the projector.
    "pretrain": ("image_gen_projector", "image_gen_projector_out", "vargpt_gen.class_emb"),
    "sft_mixed": ("language_model",),
    "sft_gen": ("image_gen_projector", "image_gen_projector_out", "vargpt_gen"),
}


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_stage_trains_exactly_the_reference_parameters(tiny, stage):
    report = apply_stage(tiny, stage_trainable(stage), stage)
    names = [n for n, _ in tiny.named_parameters()]
    expected = {n for n in names if under(n, *EXPECTED[stage])}
    assert set(report.trainable_names) == expected
    assert {n for n, p in tiny.named_parameters() if p.requires_grad} == expected
    # Never the vision tower or the VQ-VAE.
    assert not any(under(n, "vision_tower", "vae_local") for n in expected)
    assert report.num_trainable == sum(p.numel() for n, p in tiny.named_parameters() if n in expected)


def test_stage_prefixes_are_not_substrings(tiny):
    report = apply_stage(tiny, stage_trainable("pretrain"), "pretrain")
    trained = set(report.trainable_names)
    assert "vargpt_gen.class_emb.weight" in trained
    assert "image_gen_projector_out.mlp.0.weight" in trained
    # The release's substring match would hit these; prefixes do not.
    assert "vargpt_gen.head_nm.ada_lin.1.weight" not in trained
    assert "vargpt_gen.head.weight" not in trained
    assert not any(n.startswith("language_model") for n in trained)


def test_stage2_projector_switch(tiny):
    """One override trains the projector too, as the paper's stage diagram shows."""
    assert stage_trainable("sft_mixed")["multi_modal_projector"] is False
    trainable = {**stage_trainable("sft_mixed"), "multi_modal_projector": True}
    report = apply_stage(tiny, trainable, "sft_mixed")
    names = [n for n, _ in tiny.named_parameters()]
    assert set(report.trainable_names) == {n for n in names if under(n, "language_model", "multi_modal_projector")}


def test_frozen_modules_stay_in_eval_mode(tiny):
    report = apply_stage(tiny, stage_trainable("pretrain"), "pretrain")
    tiny.train()
    from vargpt.training.stage import set_frozen_eval

    set_frozen_eval(tiny, report.frozen_modules)
    assert not tiny.vargpt_gen.blocks.training and not tiny.language_model.training
    assert not tiny.vae_local.training and not tiny.vision_tower.training
    assert tiny.image_gen_projector.training and tiny.vargpt_gen.training  # partly trainable parent
    assert "vargpt_gen.blocks" in report.frozen_modules
    table = report.table()
    assert "vargpt_gen.class_emb" in table and "language_model" in table


def test_nested_prefix_longest_wins(tiny):
    report = apply_stage(tiny, {"vargpt_gen": True, "vargpt_gen.class_emb": False}, "x")
    assert "vargpt_gen.class_emb.weight" not in report.trainable_names
    assert "vargpt_gen.head.weight" in report.trainable_names


@pytest.mark.parametrize(
    ("trainable", "message"),
    [
        ({"image_gen_projektor": True}, "names no sub-module"),
        ({"vae_local": True}, "stays frozen"),
        ({"language_model": False}, "trains nothing"),
    ],
)
def test_stage_errors_name_the_problem(tiny, trainable, message):
    with pytest.raises(ValueError, match=message):
        apply_stage(tiny, trainable, "bad")


# --------------------------------------------------------------------------------------------- optimizer
def test_param_groups_no_decay_and_module_lrs(tiny):
    apply_stage(tiny, stage_trainable("sft_gen"), "sft_gen")
    groups = param_groups(tiny, lr=1e-4, weight_decay=0.1, lr_by_module={"vargpt_gen.blocks": 5e-5})
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {
        "default/decay",
        "default/no_decay",
        "vargpt_gen.blocks/decay",
        "vargpt_gen.blocks/no_decay",
    }
    no_decay = set(by_name["default/no_decay"]["param_names"]) | set(
        by_name["vargpt_gen.blocks/no_decay"]["param_names"]
    )
    for n in (
        "vargpt_gen.pos_start",
        "vargpt_gen.pos_1LC",
        "vargpt_gen.class_emb.weight",
        "vargpt_gen.lvl_embed.weight",
    ):
        assert n in no_decay
    assert "image_gen_projector.ln_q.weight" in no_decay
    assert all(n.endswith("weight") for n in by_name["default/decay"]["param_names"])
    assert by_name["vargpt_gen.blocks/decay"]["lr"] == 5e-5 and by_name["default/decay"]["lr"] == 1e-4
    assert all(g["weight_decay"] == 0.0 for k, g in by_name.items() if k.endswith("no_decay"))
    trained = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert {n for g in groups for n in g["param_names"]} == trained  # frozen parameters stay out
    with pytest.raises(ValueError, match="match no trainable"):
        param_groups(tiny, 1e-4, 0.0, {"language_model": 1e-5})


def test_schedule_warmup_then_cosine():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[warmup - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :], strict=False))
    assert lr_factor(total, total, warmup, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant", 0.0) == 1.0
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)


def test_batch_arithmetic():
    assert accumulation_steps(128, 8, 8) == 2  # the released stage 3: 8 per device x 2 x 8 GPUs
    assert accumulation_steps(16, 8, 1) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(100, 8, 2)
    assert optimizer_steps(1000, 128) == 8


# --------------------------------------------------------------------------------------------- tracking
def test_tracking_helpers(tmp_path):
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    sha, dirty = tracking.git_state(Path(__file__).parent)
    assert len(sha) == 40 and isinstance(dirty, bool)
    assert tracking.git_state(tmp_path) == ("unknown", False)


# --------------------------------------------------------------------------------------------- checkpoints
def save_step(path: Path, step: int) -> Path:
    """A minimal training checkpoint: what the resume reader looks at."""
    totals = {"samples": 4 * step, "tokens": 40 * step, "seconds": 1.5}
    torch.save({"global_step": step, "state_dict": {}, "callbacks": {"ThroughputMonitor": totals}}, path)
    return path


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_resume_resolution(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None
    assert ckpt.resolve_resume("false", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="resume=true"):
        ckpt.resolve_resume("true", tmp_path)
    save_step(tmp_path / "last.ckpt", 3)
    point = ckpt.resolve_resume("auto", tmp_path)
    assert point == ckpt.ResumePoint(str(tmp_path / "last.ckpt"), 3, {"samples": 12, "tokens": 120, "seconds": 1.5})
    assert ckpt.resolve_resume("True", tmp_path).path == str(tmp_path / "last.ckpt")
    assert ckpt.resolve_resume("false", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)


def test_damaged_last_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    """A cut-short last.ckpt is named and the newest intact step*.ckpt taken instead (the run's own earlier state,
    from which resume replays the same steps); a PATH is never swapped; nothing intact left says what to do."""
    last = save_step(tmp_path / "last.ckpt", 6)
    for step in (2, 4, 6):
        save_step(tmp_path / f"step{step:07d}.ckpt", step)
    cut_short(last)
    cut_short(tmp_path / "step0000006.ckpt")
    with caplog.at_level(logging.WARNING, logger="vargpt.training.checkpointing"):
        point = ckpt.resolve_resume("auto", tmp_path)
    assert point.path == str(tmp_path / "step0000004.ckpt") and point.global_step == 4
    assert f"{last}: cannot be read" in caplog.text and "resuming from" in caplog.text
    with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(str(last))}: cannot be read"):
        ckpt.resolve_resume(str(last), tmp_path)
    for step in (2, 4):
        cut_short(tmp_path / f"step{step:07d}.ckpt")
    with pytest.raises(CorruptCheckpointError, match="No intact step\\*.ckpt .* resume=false"):
        ckpt.resolve_resume("true", tmp_path)


def test_stage_record_round_trip(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run stage=pretrain first"):
        ckpt.resolve_init_from("previous", "pretrain", tmp_path)
    record = ckpt.StageRecord("pretrain", "pretrain-tiny-x", "/c/last.ckpt", None, "abc", 10, ckpt.now())
    path = ckpt.write_stage_record(tmp_path, record)
    assert json.loads(path.read_text())["mlflow_run_id"] == "abc"
    assert ckpt.resolve_init_from("previous", "pretrain", tmp_path) == ("/c/last.ckpt", "abc")
    assert ckpt.resolve_init_from(None, "pretrain", tmp_path) == (None, None)


def test_init_weights_from_lightning_checkpoint(tiny, tmp_path):
    """A Lightning checkpoint's ``model.``-prefixed state dict loads strictly into a fresh model."""
    from vargpt.checkpoint import CheckpointMismatchError

    state = {f"model.{k}": v.clone() for k, v in tiny.state_dict().items()}
    state["model.image_gen_projector.mlp.0.weight"] += 1
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "a.ckpt")
    fresh = build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), IDS)
    ckpt.load_init_weights(fresh, tmp_path / "a.ckpt")
    assert torch.equal(fresh.image_gen_projector.mlp[0].weight, tiny.image_gen_projector.mlp[0].weight + 1)
    del state["model.vargpt_gen.head.weight"]
    torch.save({"state_dict": state}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointMismatchError, match="vargpt_gen.head.weight") as info:
        ckpt.load_init_weights(fresh, tmp_path / "b.ckpt")
    # The advice is one the command line can follow (no config key loads non-strictly).
    assert "strict=False" not in str(info.value) and "vargpt.convert --to released --no-strict" in str(info.value)
    assert info.value.report.missing == ["vargpt_gen.head.weight"]


# --------------------------------------------------------------------------------------------- FSDP branch alignment
def test_dummy_branches_run_the_units_without_teaching(tiny):
    """A rank whose batch lacks images gets dummy ones (fully masked): the text loss is unchanged and the vision
    tower and the VAR blocks run, as they do on the ranks whose batches have images."""
    from vargpt.training.parallel import add_missing_branches, branch_presence

    tiny.eval()
    ids = torch.tensor([[10, 11, 12, 13, IDS.eos]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    plain = tiny(batch)
    padded = add_missing_branches(batch, tiny, und=True, gen=True)
    assert branch_presence(padded) == (True, True) and branch_presence(batch) == (False, False)
    assert padded["input_ids"].shape[0] == 3 and (padded["labels"][1:] == -100).all()
    out = tiny(padded)
    assert out.loss_image is not None
    assert torch.allclose(out.loss_text, plain.loss_text, atol=1e-6)


# --------------------------------------------------------------------------------------------- validation metrics
def test_prompt_gain_pairs_each_target_with_another_prompt():
    """val/prompt_gain_image_s<k> = image CE with the targets rolled over the batch's prompts - with their own."""
    from types import SimpleNamespace

    from vargpt.config import TrainerConfig
    from vargpt.training.lightning_module import VARGPTModule, metric_names

    torch.manual_seed(0)  # the gain's size depends on the random init: torch's default seed differs per process
    model = build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), IDS).eval()
    stage = OmegaConf.load(CONF / "stage" / "sft_gen.yaml").stage
    module = VARGPTModule(model, stage, OmegaConf.structured(TrainerConfig), total_steps=1, seed=0)
    module._trainer = SimpleNamespace(strategy=None, world_size=1)  # one process, nothing sharded
    L, K = model.num_gen_tokens, len(model.cfg.vqvae.patch_nums)
    prompts = [[10, 11, 12], [13, 14, 15], [16, 17, 18]]
    ids = torch.tensor([p + [IDS.gen_start] + [IDS.gen_pad] * L + [IDS.gen_end] for p in prompts])
    torch.manual_seed(0)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "gen_codes": torch.randint(0, model.cfg.vqvae.vocab_size, (3, L)),
    }
    with torch.no_grad():
        right = model(batch).metrics
        rolled = model({**batch, "gen_codes": batch["gen_codes"].roll(1, 0)}).metrics
        gain = module.prompt_gain(batch, right)
    names = ["prompt_gain_image"] + [f"prompt_gain_image_s{k}" for k in range(K)]
    assert sorted(gain) == sorted(names) and set(names) <= set(metric_names(K))
    for name in names:
        own = name.replace("prompt_gain_", "loss_")
        assert torch.allclose(gain[name], rolled[own] - right[own], atol=1e-6), name
    # The same prompt everywhere: rolling only permutes the batch, so the right prompt gains nothing.
    same = {**batch, "input_ids": ids[:1].expand(3, -1).clone()}
    with torch.no_grad():
        flat = module.prompt_gain(same, model(same).metrics)
    assert all(v.abs() < 1e-5 for v in flat.values()) and gain["prompt_gain_image"].abs() > 1e-4
    one = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad():
        assert module.prompt_gain(one, model(one).metrics) == {}
