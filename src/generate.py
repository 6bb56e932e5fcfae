"""Generate a reply (text and images) with a VARGPT from the command line: a thin Hydra entry point.

    python src/generate.py prompt="Draw a red circle" n=4                           # random tiny model
    python src/generate.py ckpt=logs/runs/<run>/export prompt="Draw a red circle" sampling.cfg=3
    python src/generate.py ckpt=/models/VARGPT_LLaVA-7B prompt="What is shown?" image=cat.jpg
    python src/generate.py ckpt=last.ckpt model=tiny tokenizer=data/shapes/tokenizer sampling=greedy

Writes ``sample{i}_image{j}.png`` and ``manifest.json`` (prompt, input image, checkpoint, sampling config, and per
sample its seed, text, finish reason and image files) to ``out_dir``. The generation itself is
``vargpt.inference.generate`` and the model is loaded by ``vargpt.inference.load_model`` (as ``src/eval.py``
loads it); configs are ``conf/generate.yaml`` and ``conf/sampling/*.yaml``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image

from vargpt.cli_config import NON_SCHEMA_GROUPS, GenerateConfig
from vargpt.config import refuse_extra_keys, register_configs, unknown_override_key
from vargpt.data.transforms import read_image_file
from vargpt.inference import generate, load_model
from vargpt.inference.loading import resolve_device
from vargpt.model.sampling_config import SamplingConfig
from vargpt.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER

log = logging.getLogger("generate")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def load_input_image(path: str) -> Image.Image:
    """The ``image=`` input decoded to RGB as the data pipeline does, read before the model loads so that a wrong
    path fails at once; raises naming the path."""
    return read_image_file(path, f"image={path}")


def run(cfg: DictConfig) -> Path:
    """Load, generate, write PNGs and the manifest; returns the manifest's path."""
    refuse_extra_keys(cfg, GenerateConfig)
    sampling = SamplingConfig.coerce(cfg.sampling)
    if cfg.n < 1:
        raise ValueError(f"n must be >= 1, got {cfg.n}")
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str(cfg.device))
    dtype = getattr(torch, str(cfg.dtype))  # one of GenerateConfig's Dtype names, checked when composing
    image = None if cfg.image is None else load_input_image(str(cfg.image))
    model, what = load_model(cfg, out_dir)
    model = model.to(device=device, dtype=dtype).eval()

    prompt = str(cfg.prompt)
    images = None
    if image is not None:
        if IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        images = [[image] for _ in range(cfg.n)]
    force = cfg.image is None if cfg.force_image is None else bool(cfg.force_image)
    log.info("%s on %s (%s): %d x %r, force_image=%s", what, device, cfg.dtype, cfg.n, prompt, force)
    outputs = generate(model, [prompt] * cfg.n, images=images, sampling=sampling, force_image=force, system=cfg.system)

    samples = []
    for i, out in enumerate(outputs):
        files = []
        for j, img in enumerate(out.images):
            name = f"sample{i}_image{j}.png"
            img.save(out_dir / name)
            files.append(name)
        samples.append({"seed": out.seed, "text": out.text, "finish_reason": out.finish_reason, "images": files})
        shown = out.text.replace(IMAGE_GEN_PLACEHOLDER, "[image]")
        log.info("sample %d (seed %d, %s): %r %s", i, out.seed, out.finish_reason, shown, files)
    manifest = {
        "prompt": prompt,
        "image": None if cfg.image is None else str(cfg.image),
        "ckpt": None if cfg.ckpt is None else str(cfg.ckpt),
        "model": what,
        "force_image": force,
        "system": cfg.system,
        "device": str(device),
        "dtype": str(cfg.dtype),
        "sampling": sampling.to_dict(),
        "samples": samples,
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    log.info("wrote %d image(s) and %s", sum(len(s["images"]) for s in samples), path)
    return path


register_configs()  # generate_schema, and ${vargpt_repo:} in conf/model


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> str:
    return str(run(cfg))


if __name__ == "__main__":
    if problem := unknown_override_key(sys.argv[1:], GenerateConfig, NON_SCHEMA_GROUPS):
        sys.exit(problem)
    main()
