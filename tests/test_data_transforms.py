"""Image preprocessing for understanding (CLIP) and generation targets (VAR) (vargpt.data.transforms)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.data import TINY_MODEL, image_bytes, world_tokenizer
from omegaconf import OmegaConf
from PIL import Image

from vargpt.data.config import DataConfig, ModelInputs, check_data_config
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.transforms import (
    CapPixels,
    ReleaseCLIPImageProcessor,
    clip_transform,
    decode_image,
    var_transform,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TINY_SIZE = TINY_MODEL.vision.image_size
DATA_CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def release_processor(image_size: int) -> ReleaseCLIPImageProcessor:
    """The processor as the release loads it: preprocessor_config.json of openai/clip-vit-large-patch14-336
    (its sizes replaced by ``image_size``), old-style int sizes and all."""
    config = {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": list(MEAN),
        "image_std": list(STD),
        "resample": 3,
        "size": image_size,
    }
    return ReleaseCLIPImageProcessor.from_dict(config)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Every pixel independent: any difference in resize taps or crop offset changes the output."""
    rgb_HW3 = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(rgb_HW3)


def processed(image_size: int, img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(release_processor(image_size)(img, return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize("image_size", [336, TINY_SIZE])
@pytest.mark.parametrize("size", [(1024, 683), (333, 500), (500, 333), (TINY_SIZE, TINY_SIZE), (67, 45)])
def test_clip_transform_equals_clip_image_processor(image_size, size):
    img = noise_image(*size)
    x = clip_transform(image_size, MEAN, STD)(img)
    assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
    assert torch.equal(x, processed(image_size, img))  # zero difference, not close


def test_clip_transform_resizes_short_side_crops_and_normalises():
    img = Image.new("RGB", (80, 40), (255, 0, 128))
    x = clip_transform(32, MEAN, STD)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.tensor([(1.0 - MEAN[0]) / STD[0], (0.0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]])
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


def test_training_cap_shrinks_with_nearest_before_clip():
    img = noise_image(1024, 683)
    capped = CapPixels(512 * 512)(img)
    # LLaMA-Factory: factor sqrt(262144 / 699392), each side truncated.
    assert capped.size == (626, 418)
    assert np.array_equal(np.asarray(capped), np.asarray(img.resize((626, 418), resample=Image.NEAREST)))
    x = clip_transform(336, MEAN, STD, max_pixels=512 * 512)(img)
    assert torch.equal(x, processed(336, capped))
    assert not torch.equal(x, processed(336, img))
    small = noise_image(500, 333)  # under the cap: untouched
    assert torch.equal(clip_transform(336, MEAN, STD, max_pixels=512 * 512)(small), processed(336, small))
    for off in (None, 0):
        assert torch.equal(clip_transform(336, MEAN, STD, max_pixels=off)(img), processed(336, img))
    with pytest.raises(ValueError, match="max_pixels"):
        clip_transform(336, MEAN, STD, max_pixels=-1)


def test_clip_transform_survives_pickling_for_loader_workers():
    img = noise_image(333, 500)
    for max_pixels in (None, 300 * 200):
        transform = clip_transform(TINY_SIZE, MEAN, STD, max_pixels=max_pixels)
        assert torch.equal(pickle.loads(pickle.dumps(transform))(img), transform(img))


def test_data_config_und_max_pixels_default_check_and_data_module():
    assert DataConfig().und_max_pixels == 512 * 512
    for path in sorted(DATA_CONF.glob("*.yaml")):
        assert OmegaConf.load(path).und_max_pixels == 512 * 512, path.name
    check_data_config(DataConfig(und_max_pixels=None))
    with pytest.raises(ValueError, match=r"data\.und_max_pixels"):
        check_data_config(DataConfig(und_max_pixels=-5))
    img = noise_image(200, 100)  # 20000 pixels
    for train in (True, False):  # LLaMA-Factory's evaluation split goes through the same plugin
        dm = VARGPTDataModule(DataConfig(und_max_pixels=5000), ModelInputs.of(TINY_MODEL), world_tokenizer())
        x = dm.processor(train=train).und_transform(img)
        assert torch.equal(x, processed(TINY_SIZE, CapPixels(5000)(img)))
        assert not torch.equal(x, processed(TINY_SIZE, img))
    dm = VARGPTDataModule(DataConfig(und_max_pixels=None), ModelInputs.of(TINY_MODEL), world_tokenizer())
    assert torch.equal(dm.processor(train=True).und_transform(img), processed(TINY_SIZE, img))


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
