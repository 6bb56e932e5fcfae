"""CLIP score with a tiny open_clip model saved to and loaded from a local file."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vargpt.eval.clip_score import OpenCLIP, OpenCLIPScore, clip_scores, load_open_clip

ARCH = "ViT-B-32"
# A few-million-parameter CLIP (most of it the 49408-token embedding the bundled tokenizer needs).
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEXTS = ["a red square", "a blue circle on grass", "two green triangles", "an empty white canvas"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, **TINY)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (len(TEXTS), 3, 40, 48), dtype=torch.uint8, generator=generator)


def reference_cosines(checkpoint: Path, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosines computed directly with open_clip from the saved state dict, independently of the module."""
    model = open_clip.create_model(ARCH, **TINY)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer(ARCH, context_length=16)
    pixels = torch.stack([preprocess(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokenizer(texts))
    return torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)


def test_scores_match_direct_computation(checkpoint: Path, images: torch.Tensor) -> None:
    clip = load_open_clip(ARCH, checkpoint, TINY)
    scores = clip_scores(clip, images, TEXTS)
    expected = 100 * reference_cosines(checkpoint, images, TEXTS).clamp(min=0)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.shape == (len(TEXTS),)
    assert bool(((scores >= 0) & (scores <= 100)).all())


def test_negative_cosines_clamp_to_zero(checkpoint: Path, images: torch.Tensor) -> None:
    clip = load_open_clip(ARCH, checkpoint, TINY)
    cosines = reference_cosines(checkpoint, images, TEXTS)
    with torch.no_grad():
        clip.model.text_projection.neg_()  # flips the sign of every text embedding, hence of every cosine
    flipped = clip_scores(clip, images, TEXTS)
    torch.testing.assert_close(flipped, 100 * (-cosines).clamp(min=0), atol=1e-4, rtol=1e-4)
    # Among the pairs of the two models, one of each is clamped at exactly 0 (unless the cosine is 0).
    original = clip_scores(load_open_clip(ARCH, checkpoint, TINY), images, TEXTS)
    assert bool(((original == 0) | (flipped == 0)).all())
    assert bool((original + flipped > 0).all())


def test_pil_and_float_images_agree_with_uint8(checkpoint: Path, images: torch.Tensor) -> None:
    clip = load_open_clip(ARCH, checkpoint, TINY)
    as_uint8 = clip_scores(clip, images, TEXTS)
    as_float = clip_scores(clip, images.float() / 255, TEXTS)
    as_pil = clip_scores(clip, [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images], TEXTS)
    torch.testing.assert_close(as_float, as_uint8)
    torch.testing.assert_close(as_pil, as_uint8)


def test_metric_accumulates_and_merges(checkpoint: Path, images: torch.Tensor) -> None:
    expected = clip_scores(load_open_clip(ARCH, checkpoint, TINY), images, TEXTS).mean()
    metric = OpenCLIPScore(ARCH, str(checkpoint), TINY)
    metric.update(images[:1], TEXTS[:1])
    metric.update(images[1:], TEXTS[1:])
    torch.testing.assert_close(metric.compute(), expected)
    # Sum-reduced states: merging two ranks' states gives the mean over all pairs, as DDP sync does.
    # A Hydra/OmegaConf model config works as well as a plain dict.
    first, second = OpenCLIPScore(ARCH, checkpoint, OmegaConf.create(TINY)), OpenCLIPScore(ARCH, checkpoint, TINY)
    first.update(images[:3], TEXTS[:3])
    second.update(images[3:], TEXTS[3:])
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), expected)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())


def test_errors(checkpoint: Path, images: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local checkpoints"):
        load_open_clip(ARCH, tmp_path / "missing.pt", TINY)
    clip = load_open_clip(ARCH, checkpoint, TINY)
    with pytest.raises(ValueError, match="one text per image"):
        clip_scores(clip, images, TEXTS[:2])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        clip_scores(clip, images[0], TEXTS[:1])
    assert isinstance(clip, OpenCLIP)
