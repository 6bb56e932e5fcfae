"""CLIP score of generated images against their prompts, computed with open_clip from a local checkpoint.

The score is torchmetrics' definition, ``CLIPScore(I, C) = max(100 * cos(E_I, E_C), 0)`` per image-caption pair,
averaged over pairs (VARGPT reports 27.4 for text-to-image generation).

Why not torchmetrics' ``CLIPScore`` itself:

* its built-in models are Hugging Face hub names (no local file, no open_clip), and with transformers 5.x
  ``CLIPModel.get_image_features`` returns an output object instead of a tensor, which its update cannot normalise;
* its callable hook expects a Hugging Face style (model, processor) pair; adapting open_clip's model, transform and
  tokenizer to that interface is as much code as the score, and would still inherit the next point;
* its ``compute`` clamps the *mean* of ``100 * cos`` at 0 instead of clamping each pair as its documented formula
  says. The two agree for trained CLIP models (cosines are positive) but not for small or untrained ones.

So :class:`OpenCLIPScore` is a ``torchmetrics.Metric`` with sum-reduced states: under DDP/FSDP its ``compute``
aggregates every rank's pairs, as torchmetrics' own metric would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision.transforms.functional import to_pil_image

logger = logging.getLogger(__name__)

ImageBatch = Tensor | Sequence[Image.Image]


@dataclass(frozen=True)
class OpenCLIP:
    """An open_clip model with the image transform and tokenizer that belong to it."""

    model: nn.Module
    preprocess: Callable[[Image.Image], Tensor]
    tokenizer: Callable[[list[str]], Tensor]


def _plain(value: Any) -> Any:
    """Nested mappings and sequences (e.g. an OmegaConf node) as plain dicts and lists, which open_clip expects."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def load_open_clip(
    arch: str, weights: str | os.PathLike | None, model_cfg: Mapping[str, Any] | None = None
) -> OpenCLIP:
    """Build the open_clip architecture ``arch`` and load a local checkpoint, without touching the network.

    Args:
        arch: open_clip model name (see ``open_clip.list_models()``). OpenAI's checkpoints need the QuickGELU
            variant: torchmetrics' default ``openai/clip-vit-large-patch14`` is ``"ViT-L-14-quickgelu"`` here.
        weights: path of a local checkpoint (an open_clip ``state_dict``, plain, under ``"state_dict"``, or
            ``.safetensors``). ``None`` keeps the random initialisation, which is only useful for smoke tests.
        model_cfg: keys replacing those of ``arch``'s open_clip config, e.g. a tiny ``embed_dim`` / ``vision_cfg`` /
            ``text_cfg`` for tests. The tokenizer is still ``arch``'s, so keep its vocabulary.
    """
    if weights is not None and not os.path.isfile(weights):
        # open_clip would take an unknown string for a pretrained tag and try to download it.
        raise FileNotFoundError(f"CLIP weights file not found: {weights} (CLIP score loads only local checkpoints)")
    if weights is None:
        logger.warning("CLIP score model %s has random weights: its scores mean nothing", arch)
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=None if weights is None else os.fspath(weights), **_plain(model_cfg or {})
    )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch, context_length=model.context_length)
    return OpenCLIP(model=model, preprocess=preprocess, tokenizer=tokenizer)


def _to_pil(images: ImageBatch) -> list[Image.Image]:
    """PIL images from PIL images or an ``[N, 3, H, W]`` tensor (uint8 in [0, 255] or float in [0, 1])."""
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images as an [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
        images = images.detach().cpu()
        if images.is_floating_point():
            # Round ourselves: to_pil_image truncates after scaling and wraps values outside [0, 1] around.
            images = (images.clamp(0.0, 1.0) * 255).round().to(torch.uint8)
        return [to_pil_image(image) for image in images]
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def clip_scores(clip: OpenCLIP, images: ImageBatch, texts: Sequence[str]) -> Tensor:
    """Per-pair CLIP scores ``100 * max(cos(E_image, E_text), 0)``, a float tensor of shape ``[N]`` in [0, 100]."""
    pil_images = _to_pil(images)
    if len(pil_images) != len(texts):
        raise ValueError(f"CLIP score needs one text per image, got {len(pil_images)} images and {len(texts)} texts")
    device = next(clip.model.parameters()).device
    pixels = torch.stack([clip.preprocess(image) for image in pil_images]).to(device)
    tokens = clip.tokenizer(list(texts)).to(device)
    image_features = clip.model.encode_image(pixels, normalize=True)
    text_features = clip.model.encode_text(tokens, normalize=True)
    cosine = (image_features * text_features).sum(dim=-1)
    return 100.0 * cosine.clamp(min=0.0).float()


class OpenCLIPScore(Metric):
    """Mean CLIP score over all (image, text) pairs seen by ``update`` on every rank.

    ``update(images, texts)`` takes PIL images or an ``[N, 3, H, W]`` tensor (uint8, or float in [0, 1]) and ``N``
    texts; ``compute()`` returns the mean of ``100 * max(cos, 0)`` (NaN before any update). The CLIP model is a
    frozen submodule, so ``metric.to(device)`` moves it with the states.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    score_sum: Tensor
    n_pairs: Tensor

    def __init__(
        self,
        arch: str,
        weights: str | os.PathLike | None,
        model_cfg: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        clip = load_open_clip(arch, weights, model_cfg)
        self.model = clip.model
        self._preprocess = clip.preprocess
        self._tokenizer = clip.tokenizer
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: ImageBatch, texts: Sequence[str]) -> None:
        """Add the CLIP scores of a batch of (image, text) pairs."""
        scores = clip_scores(OpenCLIP(self.model, self._preprocess, self._tokenizer), images, texts)
        self.score_sum += scores.sum().to(self.score_sum)
        self.n_pairs += scores.numel()

    def compute(self) -> Tensor:
        """Mean CLIP score over all pairs, in [0, 100]."""
        return (self.score_sum / self.n_pairs).float()
