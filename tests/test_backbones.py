"""The shapes world's backbones: the stage-0 recipes run in the same app, and the committed parts load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_train_run import base_overrides, compose_train, csv_losses, data_dir  # noqa: F401 (fixture)
from test_vqvae import tiny_images, tiny_vqvae

from vargpt.backbones.app import APP as RECIPE_APP  # noqa: F401  (registers the stage-0 recipes' app)
from vargpt.backbones.assemble import assemble_parts, verify_backbones, write_final
from vargpt.backbones.build import PRODUCT_FILE
from vargpt.backbones.recipes import VQVAERecipe, foreground_weights, weighted_mse
from vargpt.checkpoint import build_from_folder
from vargpt.recipe_config import RecipeKind
from vargpt.training.checkpointing import read_stage_record
from vargpt.training.task import train
from vargpt.training.vargpt_app import APP as VARGPT_APP  # noqa: F401  (registers the VARGPT stages' app)

REPO = Path(__file__).resolve().parents[1]
BACKBONES = REPO / "backbones" / "shapes"


def recipe_overrides(world: Path, log_dir: Path, stage: str, samples: int = 8) -> list[str]:
    return [
        f"stage={stage}",
        "~experiment",
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={world}",
        "data.shapes.train=400",
        "data.shapes.val=40",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "stage.recipe.micro_batch_size=4",
        "stage.global_batch_size=4",
        f"stage.num_samples={samples}",
        "stage.recipe.val_samples=8",
        "stage.recipe.num_workers=0",
    ]


def test_committed_backbones_match_their_manifest():
    """The committed folder is complete (checksums), small, and loads strictly into the tiny VARGPT."""
    assert verify_backbones(BACKBONES) == []
    manifest = json.loads((BACKBONES / "manifest.json").read_text())
    assert manifest["total_bytes"] <= 20 * 2**20
    model, report = build_from_folder(BACKBONES)
    assert model.cfg.name == "tiny" and not report.missing and not report.unexpected


def test_every_recipe_runs_and_the_parts_assemble(data_dir, tmp_path):  # noqa: F811
    """Each stage-0 recipe trains a few steps through src/train.py's task, exports its product and records the
    stage; the parts then assemble into a VARGPT that the LLaVA stages start from, and the final folder verifies.
    """
    log_dir = tmp_path / "logs"
    for stage, kind in (
        ("world_vqvae", RecipeKind.vqvae),
        ("world_var", RecipeKind.class_var),  # reads world_vqvae's export
        ("world_vision", RecipeKind.vision_clip),
        ("world_lm", RecipeKind.text_lm),
        ("world_clip", RecipeKind.judge_clip),
    ):
        # The VQ-VAE runs one autoencoder warm-up step, then the quantised path with a revival; VAR's samples
        # are judged.
        extra = {
            "world_vqvae": ["stage.recipe.warmup_ae_steps=1", "stage.recipe.revive_every=1"],
            "world_var": ["stage.recipe.judge_per_class=1"],  # 18 samples judged at each validation
        }.get(stage, [])
        metrics = train(compose_train(recipe_overrides(data_dir, log_dir, stage) + extra))
        assert "val/loss" in metrics or "val/psnr" in metrics, (stage, metrics)
        if stage == "world_var":
            assert 0 <= metrics["val/judge_both"] <= 100, metrics
        record = read_stage_record(log_dir, stage)
        assert load_file(str(Path(record.export_dir) / PRODUCT_FILE[kind]))
    tiny_yaml, tokenizer = REPO / "conf" / "model" / "tiny.yaml", data_dir / "shapes" / "tokenizer"
    parts = assemble_parts(log_dir, tmp_path / "parts", tiny_yaml, tokenizer)
    llava = [o for o in base_overrides(data_dir, log_dir, steps=1) if o != "trainer.log_every_n_steps=1"]
    llava += ["logger=none", "~experiment", f"model.tokenizer={tokenizer}"]
    train(compose_train([*llava, "stage=world_llava_align", f"model.init_from={parts}"]))
    train(compose_train([*llava, "stage=world_llava_sft"]))
    manifest = write_final(log_dir, tmp_path / "backbones", ["test"])
    assert verify_backbones(manifest.parent) == []
    assert set(json.loads(manifest.read_text())["metrics"]) >= {"world_vqvae", "world_llava_sft"}


def test_a_short_stage_from_the_backbones_learns(data_dir, tmp_path):  # noqa: F811
    """Stage 1 from the committed backbones: the training loss falls within a few dozen CPU steps."""
    overrides = base_overrides(data_dir, tmp_path / "logs", steps=24) + [
        "stage=pretrain",
        "logger=csv",
        f"model.init_from={BACKBONES}",
        f"model.tokenizer={BACKBONES}",
        "stage.optimizer.lr=3e-3",
    ]
    cfg = compose_train(overrides)
    train(cfg)
    losses = csv_losses(Path(cfg.paths.run_dir))
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:4]) / 4
    last = sum(losses[s] for s in steps[-4:]) / 4
    assert last < first, (first, last)


def test_vqvae_recipe_starts_small_and_inits_the_codebook_from_residuals():
    """VAR's eini rule at construction; after the autoencoder warm-up every row is a residual row, hits reset."""
    vq = tiny_vqvae(vocab_size=16)
    recipe = VQVAERecipe(
        vq, codebook_init=-1.0, warmup_ae_steps=5, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, total_steps=10
    )
    assert vq.codebook.abs().max() <= 1 / 16
    vq.train()(tiny_images(4))  # records hits
    img = tiny_images(4)
    # The residuals the rows are drawn from are those of the codebook before the init.
    with torch.no_grad():
        pool_NC = vq.quantize.residual_samples(
            vq.img_to_f(img), per_scale=10_000, generator=torch.Generator().manual_seed(0)
        )
    recipe._init_codebook(img)
    assert ((vq.codebook[:, None] - pool_NC[None]).abs().amax(-1).amin(1) < 1e-5).all()
    assert vq.quantize.ema_vocab_hit_SV.sum() == 0 and vq.quantize.record_hit == 0


def test_foreground_weights_single_out_objects_and_their_edges():
    """Pixels unlike the border's colour (and a one-pixel rim) weigh 1 + w; the loss is a weighted MSE."""
    img = torch.full((2, 3, 16, 16), -0.8)
    img[0, :, 6:9, 6:9] = torch.tensor([0.9, -0.7, -0.7])[:, None, None]  # a 3x3 red object on dark
    weight = foreground_weights(img, 9.0)
    assert weight.shape == (2, 1, 16, 16)
    assert (weight[0, 0, 5:10, 5:10] == 10).all() and weight[0].sum() == 16 * 16 + 9 * 25
    assert (weight[1] == 1).all()  # a plain image: every pixel background
    recon = img.clone()
    recon[0, 0, 7, 7] = 0.0  # one object pixel off by 0.9 in one channel
    expected = 10 * 0.9**2 / (weight.sum() * 3)
    torch.testing.assert_close(weighted_mse(recon, img, weight), expected)
    torch.testing.assert_close(weighted_mse(recon, img, None), torch.nn.functional.mse_loss(recon, img))
