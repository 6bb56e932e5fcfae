"""Image preprocessing: CLIP's for understanding inputs, VAR's for generation targets (reference 1.4 and 5.4).

Both return picklable callables ``PIL.Image -> Tensor (3, S, S)`` so they run inside DataLoader workers.
"""

from __future__ import annotations

import io
import math

from PIL import Image
from torchvision import transforms as T

# LLaMA-Factory's image_resolution default: larger generation targets are first shrunk to this many pixels.
MAX_GEN_SOURCE_PIXELS = 512 * 512


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB (alpha dropped, palettes expanded) as LLaVA and VARGPT do."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class CapPixels:
    """Shrink an image above ``max_pixels`` with NEAREST, keeping its aspect (the release's first VAR step)."""

    def __init__(self, max_pixels: int = MAX_GEN_SOURCE_PIXELS) -> None:
        self.max_pixels = max_pixels

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.width * img.height <= self.max_pixels:
            return img
        factor = math.sqrt(self.max_pixels / (img.width * img.height))
        return img.resize((int(img.width * factor), int(img.height * factor)), resample=Image.NEAREST)


def clip_transform(image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]) -> T.Compose:
    """CLIPImageProcessor's steps: shortest side to ``image_size`` (bicubic), centre crop, /255, normalise."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(list(mean), list(std)),
        ]
    )


# VAR's and VARGPT's resize before the crop: shortest side to 1.125 R (288 -> 256 for R = 256).
VAR_RESIZE_RATIO = 1.125


def var_transform(image_size: int, train: bool = True, resize_ratio: float = VAR_RESIZE_RATIO) -> T.Compose:
    """VAR's preprocessing for a generation target of side R = ``image_size``, in [-1, 1].

    Shortest side to round(``resize_ratio`` R) with Lanczos, then a random R crop (centre crop when not
    ``train``), as VAR's and VARGPT's training; no flip. ``resize_ratio`` 1.0 keeps an image already at R x R
    as it is (PIL returns a copy for a same-size resize): no crop can cut what lies near its border.
    """
    if resize_ratio < 1.0:
        raise ValueError(f"resize_ratio must be >= 1.0 (the crop needs a side of at least R), got {resize_ratio}")
    crop = T.RandomCrop(image_size) if train else T.CenterCrop(image_size)
    return T.Compose(
        [
            CapPixels(),
            T.Resize(round(resize_ratio * image_size), interpolation=T.InterpolationMode.LANCZOS),
            crop,
            T.ToTensor(),
            # (x - 0.5) / 0.5 = 2x - 1: the VQ-VAE's [-1, 1] range.
            T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ]
    )
