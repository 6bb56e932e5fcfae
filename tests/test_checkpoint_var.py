"""VAR-only and VQ-VAE-only checkpoints (the class-conditional recipes): VAR's .pth format loads strictly and
round-trips bit for bit; the released d16..d30 and VQ-VAE key lists fit our modules; a VARGPT's decoder exports
to a VAR .pth that rebuilds from its own weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_checkpoint_released import ReferenceSource

from vargpt.checkpoint import (
    CheckpointMismatchError,
    export_released,
    export_var,
    export_vqvae,
    load_weights,
    read_state_dict,
    var_kwargs_from_checkpoint,
)
from vargpt.checkpoint.match import DEFAULT_RULES, Target, plan_load
from vargpt.model import VAR, SpecialTokenIds, build_var, build_vargpt, build_vqvae, load_model_config
from vargpt.model.vqvae import vqvae_from_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SMALL_VAR = dict(vocab_size=64, z_channels=8, num_classes=10, patch_nums=(1, 2, 3, 4), embed_dim=64, num_heads=2)
SMALL_VQ = dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, ch_mult=(1, 2), num_res_blocks=1)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_var_pth_loads_strictly_and_round_trips(tmp_path):
    torch.manual_seed(0)
    var = build_var(3, **SMALL_VAR)
    torch.save(var.state_dict(), tmp_path / "var_d3.pth")  # VAR's release format: a plain state dict

    kwargs = var_kwargs_from_checkpoint(tmp_path / "var_d3.pth")
    assert kwargs == dict(depth=3, attn_l2_norm=True, **SMALL_VAR)
    torch.manual_seed(1)
    other = VAR(**kwargs)
    report = load_weights(other, tmp_path / "var_d3.pth")
    assert report.ok and len(report.loaded) == len(var.state_dict())
    assert report.num_loaded_params == sum(p.numel() for p in var.parameters())
    assert same(other.state_dict(), var.state_dict())

    for name in ("out.pth", "out.safetensors"):
        path = export_var(other, tmp_path / name)
        assert same(read_state_dict(path), var.state_dict())
    raw = torch.load(tmp_path / "out.pth", weights_only=True)
    assert isinstance(raw, dict) and same(raw, var.state_dict())


def test_var_of_another_size_is_a_strict_error_naming_the_keys(tmp_path):
    torch.save(build_var(3, **SMALL_VAR).state_dict(), tmp_path / "var_d3.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(build_var(2, **SMALL_VAR), tmp_path / "var_d3.pth")
    assert "blocks.2.attn.mat_qkv.weight" in str(err.value)
    wider = build_var(3, **{**SMALL_VAR, "num_classes": 20})
    with pytest.raises(CheckpointMismatchError, match=r"class_emb.weight checkpoint \[11, 64\] vs model \[21, 64\]"):
        load_weights(wider, tmp_path / "var_d3.pth")


def test_vqvae_pth_loads_strictly_and_keeps_its_usage_stats_for_other_scales(tmp_path):
    torch.manual_seed(0)
    vq = build_vqvae(patch_nums=(1, 2, 3, 4), **SMALL_VQ)
    with torch.no_grad():
        vq.quantize.ema_vocab_hit_SV.uniform_()
    torch.save(vq.state_dict(), tmp_path / "vae.pth")
    torch.manual_seed(1)
    other = build_vqvae(patch_nums=(1, 2, 3, 4), **SMALL_VQ)
    assert load_weights(other, tmp_path / "vae.pth").ok
    assert same(other.state_dict(), vq.state_dict())
    assert same(read_state_dict(export_vqvae(other, tmp_path / "back.pth")), vq.state_dict())

    # Another patch_nums: the hit statistics (one row per scale) keep the model's values, as VAR does.
    three = build_vqvae(patch_nums=(1, 2, 4), **SMALL_VQ)
    before = three.quantize.ema_vocab_hit_SV.clone()
    report = load_weights(three, tmp_path / "vae.pth")
    assert report.ok and report.reshaped == {"quantize.ema_vocab_hit_SV": ((4, 64), (3, 64))}
    assert torch.equal(three.quantize.ema_vocab_hit_SV, before)
    assert torch.equal(three.quantize.embedding.weight, vq.quantize.embedding.weight)


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_released_var_key_lists_fit_our_var(reference_lists, depth):
    ref = reference_lists(f"var_d{depth}")
    with torch.device("meta"):
        var = build_var(depth, num_classes=1000)
    report = plan_load(Target.of(var), ReferenceSource(ref), DEFAULT_RULES)
    assert report.ok and len(report.loaded) == len(ref)
    if depth == 30:
        assert report.num_loaded_params == 2_010_020_356


def test_released_vqvae_key_list_fits_our_vqvae(reference_lists):
    ref = reference_lists("vae_ch160v4096z32")
    with torch.device("meta"):
        vq = build_vqvae()
    report = plan_load(Target.of(vq), ReferenceSource(ref), DEFAULT_RULES)
    assert report.ok and len(report.loaded) == len(ref) == 324
    assert report.num_loaded_params == 108_948_355


def test_vargpt_decoder_exports_to_a_var_that_rebuilds_from_its_weights(tmp_path):
    cfg = load_model_config(CONF / "tiny.yaml")
    torch.manual_seed(0)
    model = build_vargpt(cfg, SpecialTokenIds(image=3, pad=4, gen_start=5, gen_end=6, gen_pad=7, eos=2, bos=1))
    path = export_var(model, tmp_path / "var.pth")
    kwargs = var_kwargs_from_checkpoint(path)
    assert kwargs["num_classes"] == model.ids.gen_start + 1 and kwargs["patch_nums"] == tuple(cfg.vqvae.patch_nums)
    var = VAR(**kwargs)
    assert load_weights(var, path).ok
    assert same(var.state_dict(), model.vargpt_gen.state_dict())
    vq_path = export_vqvae(model, tmp_path / "vae.pth")
    assert same(read_state_dict(vq_path), model.vae_local.state_dict())

    # The decoder and the VQ-VAE also load straight from a whole-model folder.
    folder = export_released(model, tmp_path / "rel", dtype="fp32")
    var2 = VAR(**kwargs)
    assert load_weights(var2, folder).ok and same(var2.state_dict(), model.vargpt_gen.state_dict())
    vq2 = vqvae_from_config(cfg.vqvae)
    assert load_weights(vq2, folder).ok and same(vq2.state_dict(), model.vae_local.state_dict())
    with pytest.raises(TypeError):
        export_var(vq2, tmp_path / "nope.pth")
