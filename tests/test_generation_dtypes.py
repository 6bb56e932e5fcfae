"""Generation in float32, bfloat16 and float16 from a prompt that holds an image the model made before.

Such an image is re-encoded by the VQ-VAE (``img_to_codes``): with a half-precision model its codebook and phis
are half too, and the quantiser must still find codes in fp32 (VARGPT-REFERENCE.md 9.8) instead of failing on
mixed dtypes. Runs the tiny model (conf/model/tiny.yaml) on CPU with a world tokenizer trained in a temp folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from vargpt.data.tokenizer import train_world_tokenizer
from vargpt.inference import generate
from vargpt.model import build_vargpt, load_model_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TEXTS = ["Draw a red circle.", "Here it is.", "Now a blue square in the middle.", "What colour is it? Green."] * 20
HISTORY = [
    {"role": "user", "content": "Draw a red circle."},
    {"role": "assistant", "content": "Here it is.<image_gen>"},
    {"role": "user", "content": "Now a blue square in the middle."},
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def model_fp32(tmp_path_factory):
    tokenizer = train_world_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=300)
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "tiny.yaml"), tokenizer).eval()


def earlier_image() -> Image.Image:
    """An earlier generated image as a user would pass it back: an RGB picture, not of the model's size."""
    g = torch.Generator().manual_seed(0)
    pixels_HW3 = torch.randint(0, 256, (48, 80, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels_HW3.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generate_from_a_prompt_with_an_earlier_generated_image(model_fp32, dtype):
    model = copy.deepcopy(model_fp32).to(dtype)
    (out,) = generate(
        model, [HISTORY], images=[[earlier_image()]], sampling=dict(max_new_tokens=2, seed=3), force_image=True
    )
    R = model.cfg.vqvae.image_size
    assert len(out.images) == 1 and out.images[0].size == (R, R)
    image_3RR = out.image_tensors[0]
    assert image_3RR.shape == (3, R, R) and image_3RR.dtype == torch.float32
    assert torch.isfinite(image_3RR).all() and image_3RR.min() >= 0 and image_3RR.max() <= 1
    codes = out.image_codes[0]
    assert [c.numel() for c in codes] == [p * p for p in model.cfg.vqvae.patch_nums]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_quantiser_finds_the_codes_of_its_weights_in_fp32(model_fp32, dtype):
    """A half-precision quantiser gives exactly the codes and f_hat of an fp32 one holding the same (rounded)
    weights: its nearest-code search, embeddings and phis run in fp32 whatever the parameters' dtype."""
    half = copy.deepcopy(model_fp32.vae_local.quantize).to(dtype)
    rounded = copy.deepcopy(half).float()
    g = torch.Generator().manual_seed(1)
    side = half.max_side
    f_BCPP = torch.randn(2, half.Cvae, side, side, generator=g)
    codes_half, fhat_half = half.f_to_codes(f_BCPP)
    codes_fp32, fhat_fp32 = rounded.f_to_codes(f_BCPP)
    assert all(torch.equal(a, b) for a, b in zip(codes_half, codes_fp32, strict=True))
    assert fhat_half.dtype == torch.float32 and torch.equal(fhat_half, fhat_fp32)
    assert torch.equal(half.codes_to_fhat(codes_half), rounded.codes_to_fhat(codes_fp32))
