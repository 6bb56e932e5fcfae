"""What ``vargpt.inference.generate`` returns and counts: one :class:`GenerationOutput` per reply (built from the
decoder's :class:`ReplyProgress`), the call's :class:`GenerationStats`, and a generated image tensor to PIL."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class GenerationOutput:
    """One reply: its text (``<image_gen>`` where each image sits) and its images, in order."""

    text: str
    segments: list[str]  # the text around the images: len(images) + 1 pieces
    images: list[Any]  # PIL images (empty when return_pil=False)
    image_tensors: list[torch.Tensor]  # (3, R, R) float in [0, 1], on the CPU
    image_codes: list[list[torch.Tensor]]  # per image: K LongTensors (p_k^2,), on the CPU
    token_ids: list[int]  # the reply in the training layout: text, start, L x pad, end, text ..., eos
    finish_reason: str  # eos | stop | length
    seed: int
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as fed (image blocks expanded)
    image_logits: list[list[torch.Tensor]] | None = None  # per image, per scale (p_k^2, V) guided logits


@dataclass
class ReplyProgress:
    """Per-sample progress of a ``generate`` call (the decoder's, turned into a :class:`GenerationOutput`)."""

    seed: int
    generator: torch.Generator
    forced_codes: list[torch.Tensor] | None = None
    token_ids: list[int] = field(default_factory=list)
    segment_ids: list[int] = field(default_factory=list)  # text ids since the last image
    segments: list[str] = field(default_factory=list)
    stop_text: str | None = None  # the current segment cut at a stop string
    images: list[torch.Tensor] = field(default_factory=list)
    codes: list[list[torch.Tensor]] = field(default_factory=list)
    logits: list[list[torch.Tensor]] = field(default_factory=list)
    steps: int = 0
    finish: str | None = None


@dataclass
class GenerationStats:
    """Counters and timings of a generate call (pass one in to have it filled; ``bench/generate.py`` does).

    With ``timing=True`` the device is synchronised around every timed part, so the split is exact but the
    call is a little slower; without it only the counters are kept.
    """

    timing: bool = False
    llm_prefill_calls: int = 0
    llm_text_calls: int = 0
    llm_image_calls: int = 0
    var_calls: int = 0
    text_tokens: int = 0
    images: int = 0
    prefill_s: float = 0.0
    text_s: float = 0.0  # text steps: LLM forward, lm_head, sampling
    llm_image_s: float = 0.0  # the LLM's chunked forwards of the image scales
    var_s: float = 0.0  # VAR decoder, code sampling and the VQ-VAE's next_input
    decode_s: float = 0.0  # VQ-VAE decoder (f_hat -> pixels)
    total_s: float = 0.0

    @contextlib.contextmanager
    def timer(self, part: str, device: torch.device) -> Iterator[None]:
        """Add the time spent in the block to the field ``part`` (only with ``timing``)."""
        if not self.timing:
            yield
            return
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            setattr(self, part, getattr(self, part) + time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer measures it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_to_pil(img_3HW: torch.Tensor) -> Any:
    """(3, H, W) float in [0, 1] -> PIL RGB image."""
    arr = (img_3HW.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")
