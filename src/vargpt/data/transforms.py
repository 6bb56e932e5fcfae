"""Image preprocessing: CLIP's for understanding inputs, VAR's for generation targets (reference 1.4 and 5.4).

Both return picklable callables ``PIL.Image -> Tensor (3, S, S)`` so they run inside DataLoader workers.
Understanding inputs go through transformers' own ``CLIPImageProcessor`` with its PIL/NumPy backend, the one
the release ran (transformers 4.x, where it is the default): equal to it bit for bit by construction. A
torchvision chain rounds the resize and the crop differently (off by one pixel on some odd sizes), and
transformers 5's torchvision ``CLIPImageProcessor`` resamples differently (up to 0.03 apart).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

try:  # transformers 5: CLIPImageProcessor is the torchvision backend (not exact); the PIL one has its own name
    from transformers import CLIPImageProcessorPil as ReleaseCLIPImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/NumPy one
    from transformers import CLIPImageProcessor as ReleaseCLIPImageProcessor

# LLaMA-Factory's image_resolution default: larger training images (understanding inputs and generation
# targets alike) are first shrunk to this many pixels.
MAX_SOURCE_PIXELS = 512 * 512


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB (alpha dropped, palettes expanded) as LLaVA and VARGPT do."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def read_image_file(path: str | Path, where: str) -> Image.Image:
    """An image file decoded like :func:`decode_image`; a missing or undecodable file raises naming ``where``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        return decode_image(file.read_bytes())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError or SyntaxError for corrupt ones.
        raise ValueError(f"{where}: not an image PIL can read ({exc}); pass a JPEG, PNG or WebP file") from None


class CapPixels:
    """Shrink an image above ``max_pixels`` with NEAREST, keeping its aspect (LLaMA-Factory's ``_preprocess_image``,
    the first step of every training image in the release)."""

    def __init__(self, max_pixels: int = MAX_SOURCE_PIXELS) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive pixel count (512 x 512 as released), got {max_pixels}")
        self.max_pixels = max_pixels

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.width * img.height <= self.max_pixels:
            return img
        factor = math.sqrt(self.max_pixels / (img.width * img.height))
        return img.resize((int(img.width * factor), int(img.height * factor)), resample=Image.NEAREST)


class CLIPPixels:
    """transformers' ``CLIPImageProcessor`` (PIL/NumPy backend) built from parameters, no download: RGB image ->
    float32 (3, S, S). Shortest side to S and the other to int(S x long / short) (PIL bicubic), centre crop
    S x S, x / 255 (in float64), then (x - mean) / std (in float32)."""

    def __init__(self, image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.processor = ReleaseCLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(mean),
            image_std=list(std),
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels_13SS = self.processor(images=img, return_tensors="np")["pixel_values"]
        return torch.from_numpy(pixels_13SS[0])


def clip_transform(
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    max_pixels: int | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """The understanding-input transform (:class:`CLIPPixels`).

    ``max_pixels`` (training: ``data.und_max_pixels``) first shrinks a larger image with NEAREST, as the
    release's training data path does; None or 0 = no cap (inference and lmms-eval evaluation have none).
    """
    pixels = CLIPPixels(image_size, mean, std)
    return T.Compose([CapPixels(max_pixels), pixels]) if max_pixels else pixels


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
