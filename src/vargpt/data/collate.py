"""Collation of processed samples into the batch contract (ARCHITECTURE.md) that the model consumes.

``input_ids`` (B, T) long, right-padded with the pad token to a multiple of ``pad_to_multiple_of``;
``attention_mask`` (B, T) long; ``labels`` (B, T) long with -100 on padding; ``pixel_values`` (N_und, 3, S, S)
CLIP-normalised or None; ``pixel_gen_values`` (N_gen, 3, R, R) in [-1, 1] or None; ``gen_codes`` (N_gen, L) long,
the generation targets' precomputed VQ codes concatenated over scales, or None (a batch carries its targets as
pixels or as codes, never both); ``meta``: one dict per sample (source, id, ground truth when the data has it).
Images are stacked batch row-major, then in sequence order: the order of the image-token runs and of the
``<|image_gen_start|>`` tokens, which is the order the model masked-scatters them in. Understanding and generation
samples mix freely in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vargpt.data.chat import IGNORE_INDEX


@dataclass
class Example:
    """One processed sample: token ids and labels (T,) long, its transformed images by kind (generation targets as
    pixels or as precomputed codes (L,) long), its meta."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    pixel_gen_values: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    gen_codes: list[torch.Tensor] = field(default_factory=list)

    @property
    def is_generation(self) -> bool:
        """Whether the sample has a generation target (its modality, for length grouping)."""
        return bool(self.pixel_gen_values or self.gen_codes)


@dataclass
class Collator:
    """``examples -> batch``; picklable, so batches are built inside the DataLoader workers."""

    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        multiple = max(self.pad_to_multiple_of, 1)
        T = -(-max(len(ex.input_ids) for ex in examples) // multiple) * multiple
        input_ids_BT = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        labels_BT = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        attention_mask_BT = torch.zeros((len(examples), T), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex.input_ids)
            input_ids_BT[i, :n] = ex.input_ids
            labels_BT[i, :n] = ex.labels
            attention_mask_BT[i, :n] = 1
        und = [img for ex in examples for img in ex.pixel_values]
        gen = [img for ex in examples for img in ex.pixel_gen_values]
        codes = [c for ex in examples for c in ex.gen_codes]
        if gen and codes:
            raise ValueError("a batch holds generation targets as pixels and as codes; the model takes one kind")
        return {
            "input_ids": input_ids_BT,
            "attention_mask": attention_mask_BT,
            "labels": labels_BT,
            "pixel_values": torch.stack(und) if und else None,
            "pixel_gen_values": torch.stack(gen) if gen else None,
            "gen_codes": torch.stack(codes) if codes else None,
            "meta": [ex.meta for ex in examples],
        }
