"""The VQ-VAE decoder's fast paths (``DecodeOptions``): each equals the plain decoder within fp32 rounding,
far inside the 1/255 an 8-bit image can show, and all of them off is the plain decoder exactly."""

from __future__ import annotations

import pytest
import torch

from vargpt.model.vqvae import VQVAE, DecodeOptions
from vargpt.model.vqvae_blocks import Upsample

# Three resolution levels (two upsamples), GroupNorm(8) so that 16-channel levels are possible, 4 scales.
SMALL = dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
TOL = 1e-4  # fp32 rounding of a few dozen layers; an 8-bit image step is 2/255 = 7.8e-3 in [-1, 1]


# Debug-size ops are too small to split; extra threads only spin when the CPUs are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vq_and_codes() -> tuple[VQVAE, list[torch.Tensor]]:
    torch.manual_seed(0)
    vq = VQVAE(**SMALL, norm_groups=8).eval()
    img = torch.rand(3, 3, vq.image_size, vq.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return vq, vq.img_to_codes(img)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("side", [(4, 4), (3, 5)])
def test_phase_upsample_equals_nearest_then_conv(channels_last, side):
    torch.manual_seed(0)
    up = Upsample(16)
    x = torch.randn(2, 16, *side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    plain, phases = up(x), up(x, phases=True)
    assert phases.shape == plain.shape == (2, 16, 2 * side[0], 2 * side[1])
    assert phases.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(phases, plain, rtol=0, atol=1e-5)


def test_plain_options_are_the_plain_decoder(vq_and_codes):
    vq, codes = vq_and_codes
    f_hat = vq.codes_to_fhat(codes)
    with torch.no_grad():
        expected = vq.decoder(vq.post_quant_conv(f_hat)).clamp(-1, 1)
        assert torch.equal(vq.fhat_to_img(f_hat, DecodeOptions.plain()), expected)


@pytest.mark.parametrize(
    "options",
    [DecodeOptions(), DecodeOptions(channels_last=False), DecodeOptions(phase_upsample=False)],
    ids=["default", "phases_only", "channels_last_only"],
)
def test_fast_decode_within_fp32_rounding(vq_and_codes, options):
    vq, codes = vq_and_codes
    with torch.no_grad():
        plain = vq.codes_to_img(codes, DecodeOptions.plain())
        fast = vq.codes_to_img(codes, options)
    assert fast.shape == plain.shape and fast.is_contiguous()
    assert (fast - plain).abs().max().item() < TOL


@pytest.mark.slow
def test_compiled_decode_within_fp32_rounding(vq_and_codes):
    vq, codes = vq_and_codes
    with torch.no_grad():
        plain = vq.codes_to_img(codes, DecodeOptions.plain())
        compiled = vq.codes_to_img(codes, DecodeOptions(compile=True))
    assert (compiled - plain).abs().max().item() < TOL
