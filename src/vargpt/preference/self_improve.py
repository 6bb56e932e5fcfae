"""The self-improving loop's data step on the shapes world: the model's own images, ranked by the world's judge,
become preference pairs (VARGPT-v1.1's preference stage, closed on the embedded world).

1. ``samples`` images per training instruction (the world's ``train`` split of text-to-image instructions) from
   the model, with the release's sampling (CFG 1.5 ramped, top-k 900, top-p 0.96) and one seed per draw;
2. the judge (vargpt.eval.judge) rates each image on what the instruction asked: colour, shape, count, and
   size, position, background when asked;
3. per instruction, the best-rated image is chosen over each image rated strictly lower (``pairing=all``) or over
   the lowest only (``pairing=worst``); a reply without an image is left out (the image loss needs codes on
   both sides), and so is an instruction whose images all rate the same;
4. the pairs are written as a shard source of pair records (vargpt.data.pairs): the instruction, the two replies
   as the model wrote them (``<image_gen>`` where the image sits) and the images as PNG plus their sampled codes,
   so that training scores exactly the codes the model drew (a PNG re-encoded by the VQ-VAE need not give them).

Then ``python -m vargpt.preference.reference_logps`` adds the reference log-probabilities and
``python src/train.py stage=dpo_gen`` trains on the source (``make demo-dpo`` runs the whole loop).

    python -m vargpt.preference.self_improve --ckpt logs/runs/<stage-3 run>/export --out data/dpo/round1 \\
        --instructions 600 --samples 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vargpt.checkpoint import build_from_folder
from vargpt.checkpoint.io import state_sha256
from vargpt.data.datasets_to_shards import ConvertedSample, Converter, ConvertOptions, Part, chunk_parts, run_conversion
from vargpt.data.records import IMAGE_GEN_PLACEHOLDER
from vargpt.data.shapes import png_bytes
from vargpt.data.shards import GEN_CODES, MANIFEST_NAME, codes_member, encode_codes
from vargpt.eval.core import batched, t2i_verdict
from vargpt.eval.judge import ShapesJudge
from vargpt.eval.shapes_eval import ShapesItem, t2i_items
from vargpt.inference import generate
from vargpt.model.sampling_config import SamplingConfig

log = logging.getLogger(__name__)

PAIRINGS = ("all", "worst")
# How much each judged attribute weighs in an image's rating: "both right" (every asked object has its colour and
# its shape, the headline figure) outweighs any mix of the others.
SCORE_WEIGHTS = {
    "both": 4.0,
    "colour": 1.0,
    "shape": 1.0,
    "count": 1.0,
    "size": 1.0,
    "position": 1.0,
    "background": 1.0,
}


@dataclass
class Candidate:
    """One drawn reply: its text (``<image_gen>`` at the image), its image's codes (L,) and PNG, its rating."""

    reply: str
    codes: np.ndarray  # (L,)
    png: bytes
    scores: dict[str, float]
    seed: int

    @property
    def rating(self) -> float:
        """The judge's verdict as one number (:data:`SCORE_WEIGHTS`)."""
        return sum(SCORE_WEIGHTS[name] * value for name, value in self.scores.items())


@dataclass
class LoopStats:
    """What the sampling and judging gave: drawn replies, those without an image, the judged figures."""

    drawn: int = 0
    no_image: int = 0
    instructions_without_preference: int = 0
    sums: Counter[str] = field(default_factory=Counter)
    judged: int = 0

    def figures(self) -> dict[str, float]:
        """Percent of drawn replies with an image, and of judged images right on each attribute."""
        out = {"image_rate": 100.0 * (self.drawn - self.no_image) / max(self.drawn, 1)}
        out.update({name: 100.0 * total / max(self.judged, 1) for name, total in sorted(self.sums.items())})
        return out


def draw_candidates(
    model: Any,
    items: Sequence[ShapesItem],
    samples: int,
    sampling: SamplingConfig,
    batch_size: int,
    judge: ShapesJudge,
    stats: LoopStats,
    force_image: bool = False,
) -> Iterator[tuple[ShapesItem, list[Candidate]]]:
    """Each instruction with its judged candidates (replies without an image left out, counted in ``stats``).

    Draw ``j`` of instruction ``i`` is seeded ``sampling.seed + i * samples + j``, whatever the batching.
    """
    draws = [(item, j) for item in items for j in range(samples)]
    per_item: dict[str, list[Candidate]] = {}
    for batch in batched(draws, batch_size):
        seeds = [sampling.seed + item.index * samples + j for item, j in batch]
        prompts = [item.prompt for item, _ in batch]
        outputs = generate(model, prompts, sampling=sampling, seeds=seeds, force_image=force_image)
        for (item, j), out, seed in zip(batch, outputs, seeds, strict=True):
            stats.drawn += 1
            found = per_item.setdefault(item.id, [])
            if not out.images:
                stats.no_image += 1
            else:
                verdict = t2i_verdict(item, out.images[0], judge)
                scores = {k: v for k, v in verdict.items() if k in SCORE_WEIGHTS}
                stats.sums.update(scores)
                stats.judged += 1
                codes_L = torch.cat([c.view(-1) for c in out.image_codes[0]]).numpy()
                found.append(Candidate(_one_image_reply(out.text), codes_L, png_bytes(out.images[0]), scores, seed))
            if j == samples - 1:
                yield item, per_item.pop(item.id)


def _one_image_reply(text: str) -> str:
    """The reply up to and with its first image (the sampling allows one; the record must name one image)."""
    head, sep, tail = text.partition(IMAGE_GEN_PLACEHOLDER)
    return head + sep + tail.replace(IMAGE_GEN_PLACEHOLDER, "")


def pair_candidates(
    candidates: Sequence[Candidate], pairing: str, chosen_needs: str | None = None
) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected) pairs of one instruction: the best-rated candidate (the first drawn among equals) over
    every candidate rated strictly lower (``all``) or over the lowest-rated one (``worst``). ``chosen_needs``: an
    attribute the chosen image must have right (e.g. ``both``), else the instruction gives no pair."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r}: expected one of {', '.join(PAIRINGS)}")
    if chosen_needs is not None and chosen_needs not in SCORE_WEIGHTS:
        raise ValueError(f"chosen_needs={chosen_needs!r}: expected one of {', '.join(SCORE_WEIGHTS)}")
    if len(candidates) < 2:
        return []
    best = max(candidates, key=lambda c: c.rating)
    if chosen_needs is not None and not best.scores.get(chosen_needs):
        return []
    worse = [c for c in candidates if c.rating < best.rating]
    if pairing == "worst" and worse:
        worse = [min(worse, key=lambda c: c.rating)]
    return [(best, other) for other in worse]


def pair_record(
    item: ShapesItem, chosen: Candidate, rejected: Candidate
) -> tuple[dict[str, Any], list[bytes], dict[str, bytes]]:
    """The pair record of vargpt.data.pairs, its images (chosen's, then rejected's) and its codes members."""
    names = ["img0.png", "img1.png"]
    record = {
        "id": f"{item.id}-{chosen.seed}-{rejected.seed}",
        "messages": [{"role": "user", "content": item.prompt}],
        "chosen": {"role": "assistant", "content": chosen.reply},
        "rejected": {"role": "assistant", "content": rejected.reply},
        "images": names,
        GEN_CODES: {name: codes_member(name) for name in names},
        "source": "shapes_self_improve",
        "meta": {
            "scene": item.scene,
            "requested": item.requested,
            "chosen": chosen.scores,
            "rejected": rejected.scores,
        },
    }
    codes = {codes_member(n): encode_codes(c.codes) for n, c in zip(names, (chosen, rejected), strict=True)}
    return record, [chosen.png, rejected.png], codes


@dataclass
class PairWriter(Converter):
    """Pairs made in this process -> a shard source (the conversion driver: manifest, counts, atomic writes)."""

    source: str
    pairs: list[tuple[dict[str, Any], list[bytes], dict[str, bytes]]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "self_improve", **self.info["request"], "num_pairs": len(self.pairs)}

    def manifest_extra(self) -> dict[str, Any]:
        """How the pairs were made, and what their codes belong to (the data module checks it with
        ``data.gen_codes``): the sampling model's VQ-VAE, the images made at its size (resize ratio 1)."""
        codes = {k: self.info[k] for k in ("patch_nums", "vocab_size", "image_size", "num_tokens", "vqvae_sha256")}
        codes.update(weights=self.info["request"]["ckpt"], transform="sampled", resize_ratio=1.0, pixels="kept")
        info = {k: v for k, v in self.info.items() if k not in codes}
        return {"self_improve": info, GEN_CODES: codes}

    def parts(self, part_size: int, limit: int | None) -> Iterator[Part]:
        return chunk_parts(self.pairs, part_size, limit)

    def to_sample(self, index: int, entry: Any) -> ConvertedSample:
        record, images, codes = entry
        return ConvertedSample(record, images, codes)


def make_pairs(
    ckpt: str | Path,
    out_dir: str | Path,
    instructions: int,
    samples: int,
    pairing: str = "all",
    chosen_needs: str | None = None,
    start: int = 0,
    world_seed: int = 0,
    sampling: SamplingConfig | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    force_image: bool = False,
) -> dict[str, Any]:
    """Sample, judge and pair (see the module docstring); returns the written source's manifest. A source made by
    the same request (model weights, instructions, sampling) is returned as it is: a rerun samples nothing."""
    t0 = time.perf_counter()
    model, _ = build_from_folder(Path(ckpt))
    model.eval()
    sampling = SamplingConfig.coerce(sampling, max_new_tokens=max_new_tokens, max_images=1)
    request = {
        "ckpt": str(Path(ckpt).resolve()),
        "model_sha256": state_sha256(model),
        "instructions": instructions,
        "start": start,
        "samples": samples,
        "pairing": pairing,
        "chosen_needs": chosen_needs,
        "force_image": force_image,
        "world_seed": world_seed,
        "sampling": dataclasses.asdict(sampling),
    }
    manifest_path = Path(out_dir) / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("self_improve", {}).get("request") == json.loads(json.dumps(request)):
            log.info("%s holds the pairs of this request (%d): nothing to sample", out_dir, manifest["num_samples"])
            return manifest
    judge = ShapesJudge(model.cfg.vqvae.image_size)
    items = t2i_items(instructions, world_seed, start=start, split="train")
    stats = LoopStats()
    pairs = []
    with torch.inference_mode():
        for item, candidates in draw_candidates(model, items, samples, sampling, batch_size, judge, stats, force_image):
            made = pair_candidates(candidates, pairing, chosen_needs)
            stats.instructions_without_preference += not made
            pairs += [pair_record(item, chosen, rejected) for chosen, rejected in made]
    seconds = time.perf_counter() - t0
    vqvae = model.vae_local
    info = {
        "request": request,
        "vqvae_sha256": state_sha256(vqvae, fp32=False),
        "patch_nums": list(vqvae.schedule.patch_nums),
        "vocab_size": int(vqvae.codebook.shape[0]),
        "image_size": int(vqvae.image_size),
        "num_tokens": int(model.num_gen_tokens),
        "drawn": stats.drawn,
        "no_image": stats.no_image,
        "instructions_without_preference": stats.instructions_without_preference,
        "judged_percent": stats.figures(),
        "seconds": round(seconds, 1),
    }
    log.info(
        "%d pairs from %d instructions x %d samples in %.0f s (%s)",
        len(pairs), instructions, samples, seconds, {k: round(v, 1) for k, v in stats.figures().items()},
    )  # fmt: skip
    if not pairs:
        raise ValueError(f"no pair: no instruction had two images rated differently ({info})")
    return run_conversion(PairWriter("shapes_self_improve", pairs, info), ConvertOptions(Path(out_dir), overwrite=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the model folder to sample from (a stage's export/)")
    parser.add_argument("--out", required=True, help="the pair source to write (overwritten)")
    parser.add_argument("--instructions", type=int, default=600, help="training instructions to draw for")
    parser.add_argument("--samples", type=int, default=4, help="images drawn per instruction")
    parser.add_argument("--pairing", choices=PAIRINGS, default="all")
    parser.add_argument("--chosen-needs", choices=tuple(SCORE_WEIGHTS), help="an attribute the chosen must have right")
    parser.add_argument("--start", type=int, default=0, help="first instruction (a second round takes new ones)")
    parser.add_argument("--world-seed", type=int, default=0, help="the shapes world's seed (data.shapes.seed)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--force-image", action="store_true", help="start every reply with its image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = make_pairs(
        args.ckpt,
        args.out,
        args.instructions,
        args.samples,
        args.pairing,
        args.chosen_needs,
        args.start,
        args.world_seed,
        SamplingConfig.coerce(None, seed=args.seed),
        args.batch_size,
        force_image=args.force_image,
    )
    print(f"{manifest['num_samples']} pairs in {args.out}: {manifest['self_improve']['judged_percent']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
