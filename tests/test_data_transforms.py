"""Image preprocessing for understanding (CLIP) and generation targets (VAR) (vargpt.data.transforms)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fixtures.data import image_bytes
from PIL import Image

from vargpt.data.transforms import CapPixels, clip_transform, decode_image, var_transform

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_clip_transform_resizes_short_side_crops_and_normalises():
    img = Image.new("RGB", (80, 40), (255, 0, 128))
    x = clip_transform(32, MEAN, STD)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.tensor([(1.0 - MEAN[0]) / STD[0], (0.0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]])
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


def test_var_transform_range_crop_and_determinism_in_eval():
    img = decode_image(image_bytes("PNG", size=(100, 70)))
    train, evaluation = var_transform(64, train=True), var_transform(64, train=False)
    x = train(img)
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(evaluation(img), evaluation(img))
    white = var_transform(16, train=False)(Image.new("RGB", (40, 40), (255, 255, 255)))
    assert torch.allclose(white, torch.ones_like(white), atol=1e-6)  # 255 -> +1


def test_var_transform_at_ratio_one_keeps_an_image_of_the_models_size_as_it_is():
    img = decode_image(image_bytes("PNG", size=(64, 64)))
    expected = torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1) / 127.5 - 1
    for train in (True, False):  # the random crop of a 64 px side from 64 px has one place to go
        torch.testing.assert_close(var_transform(64, train=train, resize_ratio=1.0)(img), expected)
    assert not torch.allclose(var_transform(64, train=False)(img), expected)  # VAR's 1.125 resamples and crops
    with pytest.raises(ValueError, match="resize_ratio"):
        var_transform(64, resize_ratio=0.9)


def test_large_generation_sources_are_first_shrunk_with_nearest():
    big = Image.new("RGB", (1024, 768))
    small = CapPixels()(big)
    assert small.width * small.height <= 512 * 512 and abs(small.width / small.height - 4 / 3) < 0.01
    assert CapPixels()(Image.new("RGB", (300, 200))).size == (300, 200)


def test_decode_image_gives_rgb():
    assert decode_image(image_bytes("PNG")).mode == "RGB"
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 4))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3)
