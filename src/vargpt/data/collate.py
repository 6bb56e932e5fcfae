"""Collation of processed samples into the batch contract (ARCHITECTURE.md) that the model consumes.

``input_ids`` (B, T) long, right-padded with the pad token to a multiple of ``pad_to_multiple_of``;
``attention_mask`` (B, T) long; ``labels`` (B, T) long with -100 on padding; ``pixel_values`` (N_und, 3, S, S)
CLIP-normalised or None; ``pixel_gen_values`` (N_gen, 3, R, R) in [-1, 1] or None; ``gen_codes`` (N_gen, L) long,
the generation targets' precomputed VQ codes concatenated over scales, or None (a batch carries its targets as
pixels or as codes, never both); ``meta``: one dict per sample (source, id, ground truth when the data has it).
Images are stacked batch row-major, then in sequence order: the order of the image-token runs and of the
``<|image_gen_start|>`` tokens, which is the order the model masked-scatters them in. Understanding and generation
samples mix freely in one batch.

Preference pairs (``data.pairs``, :class:`PairCollator`): B pairs make ONE batch of the contract above over 2B rows,
``[chosen_1 .. chosen_B, rejected_1 .. rejected_B]`` (one padded length, so every FSDP rank sees one shape per step),
plus ``pair_size`` = B (int) and ``ref_logps``: (2B,) float32 in the same row order, the reference model's summed
log-probs precomputed into the shards, or None when no pair has them. Each row's meta has ``pair``: ``chosen`` or
``rejected``. Labels mark the response only (text, gen_start/gen_end, ``</s>``; -100 on the prompt, gen pads and
padding): the preference loss reads the response's log-probs from them and from the generation targets, which in
a pair row all belong to its response.
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

    @property
    def num_tokens(self) -> int:
        """Its length in tokens (for length grouping)."""
        return len(self.input_ids)


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


@dataclass
class PairExample:
    """One processed preference pair: its chosen and rejected rows (each the prompt plus one response), and the
    reference model's summed log-probs ``(chosen, rejected)`` when the shard carries them."""

    chosen: Example
    rejected: Example
    ref_logps: tuple[float, float] | None = None

    @property
    def is_generation(self) -> bool:
        """Whether either row has a generation target (its modality, for length grouping)."""
        return self.chosen.is_generation or self.rejected.is_generation

    @property
    def num_tokens(self) -> int:
        """The longer row's length (what the pair pads the batch to), for length grouping."""
        return max(self.chosen.num_tokens, self.rejected.num_tokens)


@dataclass
class PairCollator:
    """``pairs -> batch`` of 2B rows, chosen rows first (see the module docstring); picklable like :class:`Collator`."""

    rows: Collator

    def __call__(self, pairs: list[PairExample]) -> dict[str, Any]:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        batch = self.rows([p.chosen for p in pairs] + [p.rejected for p in pairs])
        batch["pair_size"] = len(pairs)
        batch["ref_logps"] = _ref_logps(pairs)
        return batch


def _ref_logps(pairs: list[PairExample]) -> torch.Tensor | None:
    """The pairs' reference log-probs (2B,) float32, chosen then rejected; None when no pair has them."""
    have = [p.ref_logps is not None for p in pairs]
    if not any(have):
        return None
    if not all(have):
        ids = [p.chosen.meta.get("id") for p in pairs if p.ref_logps is None]
        raise ValueError(
            f"a batch mixes pairs with and without precomputed ref_logps (without: {ids[:5]}): precompute them for "
            "every source of the mix, or for none (the reference model then scores every pair)"
        )
    chosen = [p.ref_logps[0] for p in pairs if p.ref_logps is not None]
    rejected = [p.ref_logps[1] for p in pairs if p.ref_logps is not None]
    return torch.tensor(chosen + rejected, dtype=torch.float32)
