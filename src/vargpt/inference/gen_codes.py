"""Precomputed VQ codes: re-write a shard source with every generation target's per-scale codes stored in it.

Data preparation that runs a model (the VQ-VAE's encoder), so it lives here, above ``vargpt.model`` and
``vargpt.data``, and not in the data package (which imports no model code).

The frozen VQ-VAE turns each ``<image_gen>`` target into the same codes in every epoch (without random crop), so
encoding them once moves the encoder out of the training step and image decoding out of the loader
(``data.gen_codes=true`` then serves ``gen_codes``). :class:`GenCodesConverter` runs on the conversion driver of
:mod:`vargpt.data.datasets_to_shards` (parallel parts, resume, idempotence, manifest): a part is one input shard, read
in order; its generation images are decoded, transformed as evaluation does (resize to ``resize_ratio`` R, VAR's
1.125 by default, and centre crop: ``var_transform(train=False)``) and encoded in batches; keys, records and the
other images are kept as they are. The manifest's ``gen_codes`` block names the VQ-VAE the codes belong to
(schedule, vocabulary, image size, sha256 of its weights) and the resize ratio, which the data module checks
against the model's config and ``data.gen_resize_ratio``.

    python data_prep/encode_gen_codes.py --input data/shards/imagenet_instruct_130k \\
        --weights /models/VARGPT_LLaVA-v1 --out data/shards/imagenet_instruct_130k_codes --device cuda
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vargpt.checkpoint.io import state_sha256
from vargpt.checkpoint.load import load_weights
from vargpt.checkpoint.released import folder_model_config
from vargpt.data.datasets_to_shards import ConvertedSample, SourceRewriter
from vargpt.data.records import IMAGE_UNREADABLE, InvalidSampleError
from vargpt.data.shards import (
    GEN_CODES,
    codes_member,
    encode_codes,
    gen_image_names,
    parse_sample,
)
from vargpt.data.transforms import VAR_RESIZE_RATIO, decode_image, var_transform
from vargpt.model.config import load_model_config
from vargpt.model.vqvae import vqvae_from_config

log = logging.getLogger(__name__)


@functools.cache
def load_vqvae(weights: str, model_config: str | None, device: str) -> Any:
    """The frozen VQ-VAE of ``weights`` (a VARGPT folder or checkpoint: its ``vae_local``; or a VQ-VAE file) built
    from ``model_config`` (a ``conf/model`` YAML; default: the folder's own config), in eval mode on ``device``."""
    if model_config is None and not Path(weights).is_dir():
        raise ValueError(f"{weights} is a file: pass the model config (--model-config conf/model/<name>.yaml)")
    cfg = load_model_config(model_config) if model_config else folder_model_config(weights)
    vqvae = vqvae_from_config(cfg.vqvae)
    load_weights(vqvae, weights, strict=True, log_fn=log.info)
    vqvae.requires_grad_(False)
    return vqvae.eval().to(device)


@functools.cache
def vqvae_identity(weights: str, model_config: str | None) -> dict[str, Any]:
    """What codes belong to: the VQ-VAE's schedule, vocabulary and image size, and the sha256 of its weights."""
    vqvae = load_vqvae(weights, model_config, "cpu")
    return {
        "patch_nums": list(vqvae.schedule.patch_nums),
        "vocab_size": int(vqvae.codebook.shape[0]),
        "image_size": int(vqvae.image_size),
        "num_tokens": int(vqvae.schedule.num_tokens),
        "vqvae_sha256": state_sha256(vqvae, fp32=False),
        "weights": str(Path(weights).resolve()),
    }


@dataclass
class GenCodesConverter(SourceRewriter):
    """An existing shard source -> the same samples with their generation targets' codes (see the module doc)."""

    weights: str
    # conf/model YAML of the VQ-VAE; None: the weights folder's model_config.yaml / config.json.
    model_config: str | None = None
    # Leave the generation images' pixels out (smaller shards; the source then needs data.gen_codes=true).
    drop_pixels: bool = False
    # Generation images encoded per VQ-VAE call.
    batch_size: int = 32
    device: str = "cpu"
    # Targets' shortest side is resized to resize_ratio x R before the centre crop (data.gen_resize_ratio).
    resize_ratio: float = VAR_RESIZE_RATIO

    def codes_info(self) -> dict[str, Any]:
        """The manifest's ``gen_codes`` block."""
        pixels = "dropped" if self.drop_pixels else "kept"
        return {
            **vqvae_identity(self.weights, self.model_config),
            "transform": "var_eval",
            "resize_ratio": self.resize_ratio,
            "pixels": pixels,
        }

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": GEN_CODES, **self.input_fingerprint(), **self.codes_info()}

    def manifest_extra(self) -> dict[str, Any]:
        return {GEN_CODES: {**self.codes_info(), "input": str(Path(self.input_dir).resolve())}}

    def process_chunk(self, samples: list[dict[str, Any]]) -> list[Any]:
        """Each sample with the codes of its generation images (one VQ-VAE call for the lot), or its error."""
        vqvae = load_vqvae(self.weights, self.model_config, self.device)
        transform = var_transform(vqvae.image_size, train=False, resize_ratio=self.resize_ratio)

        def pixels_of(raw: dict[str, Any], name: str) -> torch.Tensor:
            try:
                return transform(decode_image(raw[name]))
            except Exception as exc:  # PIL raises many types for corrupt data; all mean "skip this sample"
                raise InvalidSampleError(IMAGE_UNREADABLE, f"{raw['__key__']}: {name}: {exc}") from None

        out: list[Any] = []
        pixels_N3RR: list[torch.Tensor] = []
        for raw in samples:
            try:
                record, _ = parse_sample(raw)
                names = gen_image_names(record)
                mine = [pixels_of(raw, name) for name in names]
            except InvalidSampleError as exc:
                out.append(exc)
                continue
            pixels_N3RR += mine
            out.append((raw, names))
        codes_NL = []
        if pixels_N3RR:
            with torch.no_grad():
                codes_NL = torch.cat(vqvae.img_to_codes(torch.stack(pixels_N3RR).to(self.device)), 1).cpu().numpy()
        rows = iter(codes_NL)
        return [e if isinstance(e, InvalidSampleError) else (e[0], {n: next(rows) for n in e[1]}) for e in out]

    def to_sample(self, index: int, entry: Any) -> ConvertedSample:
        if isinstance(entry, InvalidSampleError):
            raise entry
        raw, codes = entry
        record = json.loads(raw["json"])  # as stored (parse_record normalises the messages)
        if codes:
            record[GEN_CODES] = {name: codes_member(name) for name in codes}
        drop = set(codes) if self.drop_pixels else set()
        images = [None if name in drop else raw[name] for name in record["images"]]
        extra = {codes_member(name): encode_codes(codes_L) for name, codes_L in codes.items()}
        return ConvertedSample(record, images, extra)
