"""VAR's multi-scale VQ-VAE: checkpoint layout, phi routing, the agreement of its feature paths, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_lists import load_reference, state_dict_layout
from torch import nn

from vargpt.model.quant import Phi, PhiNonShared, PhiPartiallyShared, PhiShared
from vargpt.model.vqvae import VQVAE, VQVAEOutput, build_vqvae
from vargpt.model.vqvae_blocks import AttnBlock

# Debug size: channels 32/64 (GroupNorm(32) needs multiples of 32), 2x downsampling, 8x8 images, 4 scales.
TINY = dict(
    vocab_size=64,
    z_channels=8,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    patch_nums=(1, 2, 3, 4),
    share_quant_resi=4,
)
TINY_SIDE = 8


# Debug-size ops are too small to split; extra threads only spin when the CPUs are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vqvae(seed: int = 0, **overrides) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(**{**TINY, **overrides})


def tiny_images(B: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, TINY_SIDE, TINY_SIDE, generator=g) * 2 - 1


def test_default_build_matches_released_checkpoint_layout():
    ref = load_reference("vae_ch160v4096z32")
    with torch.device("meta"):
        vq = build_vqvae()
    ours = state_dict_layout(vq.state_dict())
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert sum(p.numel() for p in vq.parameters()) == 108_948_355
    assert vq.image_size == 256 and vq.schedule.num_tokens == 680


def test_phi_routing_of_the_released_model():
    vq = tiny_vqvae(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), ch_mult=(1,), num_res_blocks=0)
    phis = list(vq.quantize.quant_resi.qresi_ls)
    routed = [next(i for i, m in enumerate(phis) if m is vq.quantize.phi(k)) for k in range(10)]
    assert routed == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    ("share", "quant_resi", "container", "phi_keys"),
    [
        (0, 0.5, PhiNonShared, {f"quantize.quant_resi.{k}.weight" for k in range(4)}),
        (1, 0.5, PhiShared, {"quantize.quant_resi.qresi.weight"}),
        (2, 0.5, PhiPartiallyShared, {f"quantize.quant_resi.qresi_ls.{i}.weight" for i in range(2)}),
        (4, 0.0, PhiPartiallyShared, set()),  # quant_resi 0: identity phis, no parameters
    ],
)
def test_phi_sharing_variants(share, quant_resi, container, phi_keys):
    vq = tiny_vqvae(share_quant_resi=share, quant_resi=quant_resi)
    assert isinstance(vq.quantize.quant_resi, container)
    keys = {k for k in vq.state_dict() if k.startswith("quantize.quant_resi") and k.endswith("weight")}
    assert keys == phi_keys
    with torch.no_grad():
        codes, f_hat = vq.quantize.f_to_codes(vq.img_to_f(tiny_images()))
    assert (vq.codes_to_fhat(codes) - f_hat).abs().max() < 1e-6


def test_phi_formula():
    torch.manual_seed(0)
    phi = Phi(8, -0.5)  # VAR keeps |quant_resi|
    h = torch.randn(2, 8, 4, 4)
    conv = F.conv2d(h, phi.weight, phi.bias, padding=1)
    assert torch.allclose(phi(h), 0.5 * h + 0.5 * conv, atol=1e-6)


def test_attention_equals_explicit_single_head_softmax():
    torch.manual_seed(0)
    attn = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 32, 15).unbind(1)  # (B, C, HW) each
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32**-0.5, dim=-1)
    h = torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 3, 5)
    assert torch.allclose(attn(x), x + attn.proj_out(h), atol=1e-5)


def test_img_to_codes_shapes_determinism_and_fp32_under_autocast():
    vq = tiny_vqvae().eval()
    img = tiny_images(3)
    codes = vq.img_to_codes(img)
    assert [tuple(c.shape) for c in codes] == [(3, p * p) for p in (1, 2, 3, 4)]
    assert all(c.dtype == torch.long and int(c.min()) >= 0 and int(c.max()) < 64 for c in codes)
    assert all(torch.equal(a, b) for a, b in zip(codes, vq.img_to_codes(img), strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes_ac = vq.img_to_codes(img)
        teacher_ac = vq.codes_to_teacher_input(codes_ac)
    assert all(torch.equal(a, b) for a, b in zip(codes, codes_ac, strict=True))
    assert teacher_ac.dtype == torch.float32
    with pytest.raises(ValueError, match="8x8"):
        vq.img_to_codes(torch.zeros(1, 3, 16, 16))


def test_teacher_forcing_input_equals_incremental_next_input():
    vq = tiny_vqvae().eval()
    codes = vq.img_to_codes(tiny_images())
    teacher = vq.codes_to_teacher_input(codes)
    assert teacher.shape == (2, vq.schedule.num_tokens - 1, 8)
    f_hat, steps = None, []
    for k, codes_k in enumerate(codes):
        f_hat, nxt = vq.next_input(k, f_hat, codes_k)
        if k < len(codes) - 1:
            assert nxt.shape == (2, vq.schedule.patch_nums[k + 1] ** 2, 8)
            steps.append(nxt)
        else:
            assert nxt is None
    assert (torch.cat(steps, dim=1) - teacher).abs().max() < 1e-6


def test_three_fhat_paths_agree():
    vq = tiny_vqvae().eval()
    with torch.no_grad():
        f = vq.img_to_f(tiny_images())
    codes, f_hat_encode = vq.quantize.f_to_codes(f)
    f_hat_codes = vq.codes_to_fhat(codes)
    f_hat_steps = None
    for k, codes_k in enumerate(codes):
        f_hat_steps, _ = vq.next_input(k, f_hat_steps, codes_k)
    assert (f_hat_encode - f_hat_codes).abs().max() < 1e-6
    assert (f_hat_encode - f_hat_steps).abs().max() < 1e-6
    # Decoding goes through the same f_hat and lands in [-1, 1].
    img = vq.codes_to_img(codes)
    assert img.shape == (2, 3, TINY_SIDE, TINY_SIDE) and img.abs().max() <= 1
    assert torch.allclose(img, vq.fhat_to_img(f_hat_encode))


def test_next_input_does_not_modify_the_callers_fhat():
    vq = tiny_vqvae().eval()
    codes = vq.img_to_codes(tiny_images())
    f_hat, _ = vq.next_input(0, None, codes[0])
    before = f_hat.clone()
    vq.next_input(1, f_hat, codes[1])
    assert torch.equal(f_hat, before)


def test_load_state_dict_tolerates_other_hit_count_shape_also_when_nested():
    src, dst = tiny_vqvae(seed=0), tiny_vqvae(seed=1)
    sd = src.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, 4096)
    dst.load_state_dict(sd, strict=True)
    assert torch.equal(dst.codebook, src.codebook)
    assert dst.quantize.ema_vocab_hit_SV.shape == (4, 64)
    assert sd["quantize.ema_vocab_hit_SV"].shape == (10, 4096)  # the caller's dict is left alone

    parent = nn.Module()
    parent.vae_local = tiny_vqvae(seed=2)
    parent.load_state_dict({f"vae_local.{k}": v for k, v in sd.items()}, strict=True)
    assert torch.equal(parent.vae_local.codebook, src.codebook)


def test_training_forward_loss_gradients_and_a_few_steps_reduce_reconstruction_loss():
    vq = tiny_vqvae().train()
    img = tiny_images(4)
    out = vq(img)
    assert isinstance(out, VQVAEOutput)
    assert out.recon.shape == img.shape and len(out.codes) == 4
    assert torch.isfinite(out.vq_loss) and out.vq_loss.ndim == 0
    assert 0 < float(out.usage) <= 1
    (F.mse_loss(out.recon, img) + out.vq_loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight"):
        grad = vq.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert vq.get_parameter("quantize.quant_resi.qresi_ls.0.weight").grad is not None

    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    with torch.no_grad():
        start = F.mse_loss(vq(img).recon, img).item()
    for _ in range(20):
        out = vq(img)
        loss = F.mse_loss(out.recon, img) + out.vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = F.mse_loss(vq(img).recon, img).item()
    assert end < 0.5 * start  # typically 0.44 -> 0.05


def test_hit_counts_are_recorded_in_train_mode_only():
    vq = tiny_vqvae()
    vq.eval()(tiny_images())
    assert vq.quantize.ema_vocab_hit_SV.sum() == 0
    out = vq.train()(tiny_images())
    hits = vq.quantize.ema_vocab_hit_SV
    assert hits.sum(1).tolist() == [2 * p * p for p in (1, 2, 3, 4)]  # first record is a copy
    assert float(out.usage) == pytest.approx(float((hits.sum(0) > 0).float().mean()))


def test_revive_dead_codes_resets_unused_rows_only():
    vq = tiny_vqvae()
    assert vq.revive_dead_codes(torch.randn(100, 8)) == 0  # no hits recorded yet: nothing is judged dead
    hits = torch.ones(4, 64)
    hits[:, :10] = 0.0
    vq.quantize.ema_vocab_hit_SV.copy_(hits)
    before = vq.codebook.detach().clone()
    samples = torch.randn(100, 8) + 5
    n = vq.revive_dead_codes(samples, generator=torch.Generator().manual_seed(0))
    assert n == 10
    assert torch.equal(vq.codebook[10:], before[10:])
    revived = vq.codebook[:10].detach()
    assert all((samples == row).all(1).any() for row in revived)  # each one is an encoder feature
    assert len({tuple(r.tolist()) for r in revived}) == 10  # distinct features
    assert (vq.quantize.ema_vocab_hit_SV[:, :10] > 0).all()  # not judged dead again right away
    assert vq.revive_dead_codes(samples) == 0


def test_revive_after_real_training_steps():
    vq = tiny_vqvae(vocab_size=256).train()
    img = tiny_images(2)
    out = vq(img)
    dead = int((vq.quantize.ema_vocab_hit_SV.sum(0) == 0).sum())
    assert dead > 0  # 2 images x 30 tokens cannot cover 256 codes
    with torch.no_grad():
        f_NC = vq.img_to_f(img).permute(0, 2, 3, 1).reshape(-1, 8)
    assert vq.revive_dead_codes(f_NC) == dead
    assert out.codes[0].shape == (2, 1)


def test_eini_follows_vars_rule():
    vq = tiny_vqvae(vocab_size=64)
    vq.quantize.eini(-1.0)
    assert vq.codebook.abs().max() <= 1 / 64
    vq.quantize.eini(0.02)
    assert 0.01 < float(vq.codebook.std()) < 0.03
    before = vq.codebook.detach().clone()
    vq.quantize.eini(0.0)
    assert torch.equal(vq.codebook, before)


def test_residual_samples_are_the_residuals_each_scale_quantises():
    vq = tiny_vqvae()
    q = vq.quantize
    with torch.no_grad():
        f = vq.img_to_f(tiny_images(2))
        rows = q.residual_samples(f, per_scale=5, generator=torch.Generator().manual_seed(0))
        codes, _ = q.f_to_codes(f)
        # The last scale quantises f minus every earlier scale's contribution, at full resolution.
        last_NC = (f - sum(q.lift(k, codes[k]) for k in range(3))).permute(0, 2, 3, 1).reshape(-1, 8)
    assert rows.shape == (4 * 5, 8)

    def among(rows_nC: torch.Tensor, pool_NC: torch.Tensor) -> bool:
        return bool(((rows_nC[:, None] - pool_NC[None]).abs().amax(-1).amin(1) < 1e-5).all())

    assert among(rows[:5], f.mean((2, 3)))  # scale 0 (1x1): the area mean of f
    assert among(rows[-5:], last_NC)
