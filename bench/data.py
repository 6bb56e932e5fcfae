"""Data throughput on this machine: world build time, converter throughput, pipeline samples/s (0/1/2 workers).

    .venv/bin/python -m bench.data                 # full run (~3 minutes on 2 cores)
    .venv/bin/python -m bench.data --quick         # smaller sizes, for a smoke test
    .venv/bin/python -m bench.data --pipeline-only --group-by none,length,modality_length   # length grouping
    .venv/bin/python -m bench.data --pipeline-only --gen-codes --repeats 3   # precomputed VQ codes vs pixels

Pipeline figures are steady-state (after the first batch, which includes worker start-up), for the tiny
model (conf/model/tiny.yaml: 32 px understanding, 64 px generation, L = 130) on the shapes world, and for the
release's sizes (conf/model/vargpt_llava_7b.yaml: CLIP 336 px / 576 tokens, VAR 256 px / L = 680) on
LLaVA-style shards of 500x375 JPEGs, tokenised with the world's tokenizer (no Llama tokenizer offline).
Every pipeline row also gives its padding: the share of the batches' token slots (B x T) that are padding, the
LLM work a step wastes. ``--group-by`` runs the pipeline rows once per grouping (``data.group_by``, pools of
``--group-batches`` micro batches of 16). ``--gen-codes`` adds generation rows served as pixels and as precomputed
VQ codes (``data.gen_codes``; the sources encoded by ``vargpt.inference.gen_codes`` with a randomly initialised VQ-VAE
of the model's schedule: a loader's speed does not depend on the weights; at the 7B sizes a 32-channel one, to
encode on a CPU in seconds). ``--repeats N`` runs all pipeline rows N times in turns and keeps each one's best
rate (a shared machine's load varies).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from vargpt.checkpoint.io import MemorySource, write_safetensors
from vargpt.data.config import DataConfig, GroupBy, SourceConfig
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.dataset_formats import AnnotationConverter
from vargpt.data.datasets_to_shards import ConvertOptions, run_conversion
from vargpt.data.shapes import build_shapes_world
from vargpt.data.tokenizer import load_tokenizer
from vargpt.inference.gen_codes import GenCodesConverter
from vargpt.model.config import load_model_config
from vargpt.model.vqvae import vqvae_from_config

REPO = Path(__file__).resolve().parents[1]


def photo_like_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (500, 375)) -> None:
    """A JPEG of photo-like size and entropy (smooth gradient plus noise), ~60-90 KB like COCO images."""
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, 3) + np.linspace(0, 120, h)[:, None, None]
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def make_llava_fixture(root: Path, entries: int, generation: bool = False) -> Path:
    """LLaVA-format annotations over ``entries`` distinct photo-like JPEGs; half single-turn, half 3-turn.
    ``generation``: text-to-image instructions instead (the JPEG is the ``<image_gen>`` target)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    data = []
    for i in range(entries):
        photo_like_jpeg(root / "images" / f"{i:06d}.jpg", rng)
        turns = ["<image>\nWhat is shown in this picture? Describe it in detail.", "A gradient with noise. " * 8]
        if generation:
            turns = ["Draw a picture of a smooth gradient with some noise.", "Here it is. <image_gen>"]
        turns += ["And the colours?", "Mostly warm tones."] * (i % 2)
        convs = [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]
        data.append({"id": str(i), "image": f"{i:06d}.jpg", "conversations": convs})
    path = root / "llava_bench.json"
    path.write_text(json.dumps(data))
    return path


def pipeline_rate(dm: VARGPTDataModule, samples: int) -> tuple[float, float]:
    """Steady-state training samples/s of a data module and the padding share of all its batches' token slots.

    Each worker's first batch is left out of the rate: it holds the worker's start-up and, with length grouping,
    the filling of its first pool (afterwards a worker reads one batch of samples per batch it serves).
    """
    dm.cfg.samples_per_epoch = samples
    dm.setup("fit")
    warm = max(dm.cfg.num_workers, 1)
    count, start, real, slots = 0, 0.0, 0, 0
    for i, batch in enumerate(dm.train_dataloader()):
        real += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
        if i < warm:
            start = time.perf_counter()
            continue
        count += batch["input_ids"].shape[0]
    return count / (time.perf_counter() - start), 1 - real / slots


def data_module(
    root: Path,
    sources: dict[str, str],
    model_yaml: str,
    tokenizer,
    workers: int,
    group_by: str = "none",
    pool: int = 16,
    gen_codes: bool = False,
) -> VARGPTDataModule:
    cfg = DataConfig(
        root=str(root),
        train_sources={name: SourceConfig(path) for name, path in sources.items()},
        micro_batch_size=16,
        num_workers=workers,
        cutoff_len=2048,
        group_by=GroupBy(group_by),
        group_batches=pool,
        gen_codes=gen_codes,
    )
    return VARGPTDataModule.from_config(cfg, load_model_config(REPO / "conf" / "model" / model_yaml), tokenizer)


def encode_copy(source: Path, out: Path, model_yaml: str, vqvae_ch: int | None = None) -> float:
    """Write ``source`` with precomputed codes instead of its generation pixels (a random VQ-VAE of the model's
    schedule, ``vqvae_ch`` channels wide if given); returns the encoder's samples/s."""
    config = OmegaConf.load(REPO / "conf" / "model" / model_yaml)
    if vqvae_ch is not None:
        config.vqvae.ch = vqvae_ch
    OmegaConf.save(config, out.with_suffix(".yaml"))
    torch.manual_seed(0)
    vqvae = vqvae_from_config(load_model_config(out.with_suffix(".yaml")).vqvae)
    write_safetensors(MemorySource(vqvae.state_dict()), out.with_suffix(".vqvae"))
    weights = str(out.with_suffix(".vqvae") / "model.safetensors")
    start = time.perf_counter()
    converter = GenCodesConverter(source, weights, str(out.with_suffix(".yaml")), drop_pixels=True)
    manifest = run_conversion(converter, ConvertOptions(out))
    return manifest["num_samples"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not figures)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated data here")
    parser.add_argument("--pipeline-only", action="store_true", help="skip the build and converter timings")
    parser.add_argument("--group-by", default="none", help="comma list of data.group_by values for the pipeline rows")
    parser.add_argument("--group-batches", type=int, default=16, help="micro batches per grouping pool")
    parser.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    parser.add_argument("--gen-codes", action="store_true", help="generation rows as pixels and as precomputed codes")
    parser.add_argument("--repeats", type=int, default=1, help="run the pipeline rows N times, keep the best rate")
    args = parser.parse_args()
    pool = args.group_batches
    groupings = [GroupBy(g).value for g in args.group_by.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vargpt-bench-"))
    train, val, entries, samples = (2000, 200, 100, 256) if args.quick else (20000, 1000, 600, 2048)
    rows: list[tuple[str, str]] = []

    for workers in (2,) if args.pipeline_only else (1, 2):
        start = time.perf_counter()
        build_shapes_world(work / f"shapes{workers}", size=64, train=train, val=val, seed=0, num_workers=workers)
        seconds = time.perf_counter() - start
        rows.append((f"build shapes world ({train}+{val}, 64 px), {workers} proc", f"{seconds:.1f} s"))
        rows.append((f"  = world converter throughput, {workers} proc", f"{(train + val) / seconds:.0f} samples/s"))

    annotations = make_llava_fixture(work / "llava", entries)
    for workers in (1,) if args.pipeline_only else (1, 2):
        out = work / f"llava_shards{workers}"
        start = time.perf_counter()
        options = ConvertOptions(out, part_size=100, num_workers=workers)
        run_conversion(AnnotationConverter(annotations, work / "llava" / "images", "llava_bench"), options)
        rate = entries / (time.perf_counter() - start)
        rows.append((f"llava_to_shards (500x375 JPEG, full decode check), {workers} proc", f"{rate:.0f} samples/s"))

    world = work / "shapes2"
    tokenizer = load_tokenizer(world / "tokenizer")
    mixes = {
        "understanding (caption+vqa)": {"caption": "train/caption", "vqa": "train/vqa"},
        "generation (t2i)": {"t2i": "train/t2i"},
        "full mix (4 tasks)": {t: f"train/{t}" for t in ("caption", "vqa", "t2i", "mixed")},
    }
    # label -> (data module factory, samples per measurement)
    pipelines: dict[str, tuple[Callable[[], VARGPTDataModule], int]] = {}
    for name, sources in mixes.items():
        for group_by in groupings:
            for w in worker_counts:
                make = functools.partial(data_module, world, sources, "tiny.yaml", tokenizer, w, group_by, pool)
                pipelines[f"pipeline tiny model, {name}, group_by={group_by}, {w} workers"] = (make, samples)
    real = {"llava": str(work / "llava_shards1")}
    for group_by in groupings:
        for w in worker_counts:
            make = functools.partial(data_module, work, real, "vargpt_llava_7b.yaml", tokenizer, w, group_by, pool)
            label = f"pipeline 7B sizes, understanding (CLIP 336), group_by={group_by}, {w} workers"
            pipelines[label] = (make, samples // 4)
    if args.gen_codes:
        rate = encode_copy(world / "train" / "t2i", work / "t2i_codes", "tiny.yaml")
        rows.append(("encode_gen_codes, tiny VQ-VAE (64 px, L = 130), 1 proc", f"{rate:.0f} samples/s"))
        generation = make_llava_fixture(work / "gen", entries // 3, generation=True)
        run_conversion(AnnotationConverter(generation, work / "gen" / "images", "gen"), ConvertOptions(work / "gen_px"))
        rate = encode_copy(work / "gen_px", work / "gen_codes", "vargpt_llava_7b.yaml", vqvae_ch=32)
        rows.append(("encode_gen_codes, VQ-VAE ch 32 (256 px, L = 680), 1 proc", f"{rate:.1f} samples/s"))
        for w in worker_counts:
            for codes, tiny, big in ((False, "train/t2i", "gen_px"), (True, "t2i_codes", "gen_codes")):
                kind = "codes" if codes else "pixels"
                root = work if codes else world
                make = functools.partial(data_module, root, {"t2i": tiny}, "tiny.yaml", tokenizer, w, gen_codes=codes)
                pipelines[f"pipeline tiny model, generation (t2i) as {kind}, {w} workers"] = (make, samples)
                make = functools.partial(
                    data_module, work, {"gen": big}, "vargpt_llava_7b.yaml", tokenizer, w, gen_codes=codes
                )
                label = f"pipeline 7B sizes, generation (500x375 JPEG -> VAR 256) as {kind}, {w} workers"
                pipelines[label] = (make, samples // 4)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for label, (make, n) in pipelines.items():
            rate, pad = pipeline_rate(make(), n)
            best[label] = (max(rate, best.get(label, (0.0, 0.0))[0]), pad)
    rows += [(label, f"{rate:.0f} samples/s, padding {100 * pad:.1f} %") for label, (rate, pad) in best.items()]

    # Other processes on the machine change these figures: print the load they ran under.
    rows.append(("load average (1, 5, 15 min) at the end", ", ".join(f"{x:.1f}" for x in os.getloadavg())))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  result")
    print("-" * (width + 20))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
