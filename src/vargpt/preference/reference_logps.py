"""Precomputed reference log-probabilities: re-write a pair source with each pair's ``ref_logps``.

DPO compares the policy with a frozen reference model (the stage's starting weights). Running the reference beside
the policy doubles the model memory (a second 7B model per GPU); scoring every pair once, before training, costs one
forward per pair and nothing during training, so it is the default (``stage.preference.reference=precomputed``).
Each pair goes through the same pipeline as in training (vargpt.data.pairs: the chosen and the rejected row in one
batch) and the model's :meth:`~vargpt.model.vargpt.VARGPT.sequence_logps` in eval mode; the record gains
``ref_logps: {chosen, rejected}`` and everything else is kept (images, codes). The manifest's ``reference`` block
names the model (sha256 of its weights as fp32, path) and what was summed; training refuses a source scored by
another model than the one it starts from.

    python -m vargpt.preference.reference_logps --input data/dpo/round1 --weights logs/runs/<stage 3>/export \\
        --out data/dpo/round1_ref [--gen-codes] [--target image] [--device cuda]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vargpt.checkpoint import build_from_folder
from vargpt.checkpoint.io import state_sha256
from vargpt.data.collate import Collator, PairCollator
from vargpt.data.config import DataConfig, ModelInputs
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.datasets_to_shards import (
    ConvertedSample,
    ConvertOptions,
    SourceRewriter,
    add_output_args,
    options_from_args,
    run_cli,
)
from vargpt.data.pairs import REF_LOGPS
from vargpt.data.records import InvalidSampleError
from vargpt.data.shards import GEN_CODES, read_manifest
from vargpt.training.preference_module import pair_logps

# The manifest block naming the reference model.
REFERENCE = "reference"


@functools.cache
def load_reference(weights: str, device: str) -> Any:
    """The reference model of a model folder, frozen, in eval mode on ``device``."""
    model, _ = build_from_folder(Path(weights))
    return model.requires_grad_(False).eval().to(device)


@functools.cache
def reference_identity(weights: str) -> dict[str, str]:
    """The manifest's ``reference`` block (less ``target``): the weights' fp32 sha256 and their folder."""
    return {"sha256": state_sha256(load_reference(weights, "cpu")), "weights": str(Path(weights).resolve())}


@dataclass
class ReferenceLogpsConverter(SourceRewriter):
    """A pair source -> the same pairs with ``ref_logps`` (see the module docstring)."""

    weights: str
    target: str = "image"
    # Serve generation targets from the source's precomputed codes (data.gen_codes), as training will.
    gen_codes: bool = False
    gen_resize_ratio: float = 1.0
    cutoff_len: int = 2048
    batch_size: int = 16
    device: str = "cpu"

    def identity(self) -> dict[str, Any]:
        """The manifest's ``reference`` block: the model, and the settings training must share
        (vargpt.training.preference_module.check_precomputed_reference)."""
        settings = {"target": self.target, "gen_codes": self.gen_codes, "gen_resize_ratio": self.gen_resize_ratio}
        return {**reference_identity(self.weights), **settings}

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": REF_LOGPS, **self.input_fingerprint(), **self.identity(), "cutoff": self.cutoff_len}

    def manifest_extra(self) -> dict[str, Any]:
        """The reference block, and the input's own blocks (its codes' identity, how it was made) kept."""
        kept = {k: v for k, v in read_manifest(self.input_dir).items() if k in (GEN_CODES, "self_improve")}
        return {**kept, REFERENCE: {**self.identity(), "input": str(Path(self.input_dir).resolve())}}

    def process_chunk(self, samples: list[dict[str, Any]]) -> list[Any]:
        """Each sample with its pair's reference log-probs (one model call for the lot), or its error."""
        model = load_reference(self.weights, self.device)
        processor, collate = self._pipeline(model)
        out: list[Any] = []
        pairs = []
        for raw in samples:
            try:
                pairs.append(processor(raw, self.source))
                out.append(raw)
            except InvalidSampleError as exc:
                out.append(exc)
        if pairs:
            batch = collate(pairs)
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                logps_B2 = pair_logps(model, batch, self.target)[0].cpu().tolist()
        scored = iter(logps_B2 if pairs else [])
        return [e if isinstance(e, InvalidSampleError) else (e, tuple(next(scored))) for e in out]

    def _pipeline(self, model: Any) -> tuple[Any, PairCollator]:
        """The training pipeline's pair processor (evaluation transforms) and collator for ``model``."""
        data = DataConfig(
            pairs=True,
            pair_target=self.target,
            gen_codes=self.gen_codes,
            gen_resize_ratio=self.gen_resize_ratio,
            gen_random_crop=False,
            cutoff_len=self.cutoff_len,
        )
        module = VARGPTDataModule(data, ModelInputs.of(model.cfg), model.tokenizer)
        return module.processor(train=False), PairCollator(Collator(model.ids.pad))

    def to_sample(self, index: int, entry: Any) -> ConvertedSample:
        if isinstance(entry, InvalidSampleError):
            raise entry
        raw, (chosen, rejected) = entry
        record = json.loads(raw["json"])  # as stored
        record[REF_LOGPS] = {"chosen": chosen, "rejected": rejected}
        images = [raw.get(name) for name in record["images"]]
        extra = {member: raw[member] for member in record.get(GEN_CODES, {}).values() if member in raw}
        return ConvertedSample(record, images, extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="the pair source (a folder with manifest.json)")
    parser.add_argument("--weights", required=True, help="the reference model's folder: the DPO stage's start")
    parser.add_argument("--target", choices=("image", "text"), default="image", help="stage.preference.target")
    parser.add_argument("--gen-codes", action="store_true", help="score the source's precomputed codes")
    parser.add_argument("--gen-resize-ratio", type=float, default=1.0, help="data.gen_resize_ratio (pixels)")
    parser.add_argument("--cutoff-len", type=int, default=2048, help="data.cutoff_len")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per model call")
    parser.add_argument("--device", default="cpu")
    add_output_args(parser)
    args = parser.parse_args(argv)
    converter = ReferenceLogpsConverter(
        args.input, args.weights, args.target, args.gen_codes, args.gen_resize_ratio, args.cutoff_len,
        args.batch_size, args.device,
    )  # fmt: skip
    options: ConvertOptions = options_from_args(args)
    return run_cli(converter, options)


if __name__ == "__main__":
    sys.exit(main())
