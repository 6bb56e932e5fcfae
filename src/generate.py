"""Generate a reply (text and images) with a VARGPT from the command line: a thin Hydra entry point.

    python src/generate.py prompt="Draw a red circle" n=4                           # random tiny model
    python src/generate.py ckpt=logs/runs/<run>/export prompt="Draw a red circle" sampling.cfg=3
    python src/generate.py ckpt=/models/VARGPT_LLaVA-7B prompt="What is shown?" image=cat.jpg
    python src/generate.py ckpt=last.ckpt model=tiny tokenizer=data/shapes/tokenizer sampling=greedy

Writes ``sample{i}_image{j}.png`` and ``manifest.json`` (prompt, input image, checkpoint, sampling config, and per
sample its seed, text, finish reason and image files) to ``out_dir``. The generation itself is
``vargpt.model.generation.generate``; configs are ``conf/generate.yaml`` and ``conf/sampling/*.yaml``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vargpt.data.transforms import read_image_file
from vargpt.model.config import register_resolvers

log = logging.getLogger("generate")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def throwaway_tokenizer(out_dir: Path) -> Any:
    """A shapes-world tokenizer trained in a second on a small slice of the world's text (random models only)."""
    from vargpt.data.shapes import split_counts, world_texts
    from vargpt.data.tokenizer import train_world_tokenizer

    return train_world_tokenizer(world_texts(split_counts(400), seed=0), out_dir / "tokenizer", vocab_size=1000)


def load_input_image(path: str) -> Image.Image:
    """The ``image=`` input decoded to RGB as the data pipeline does, read before the model loads so that a wrong
    path fails at once; raises naming the path."""
    return read_image_file(path, f"image={path}")


def load_model(cfg: DictConfig, out_dir: Path) -> tuple[torch.nn.Module, str]:
    """The model and its tokenizer from ``ckpt`` (folder, checkpoint file or nothing); returns (model, what)."""
    from vargpt.data.tokenizer import load_tokenizer
    from vargpt.model.config import ModelConfig
    from vargpt.model.vargpt import build_vargpt

    ckpt = None if cfg.ckpt is None else Path(str(cfg.ckpt)).expanduser()
    tokenizer = None if cfg.tokenizer is None else load_tokenizer(cfg.tokenizer)
    if ckpt is not None and ckpt.is_dir():
        from vargpt.checkpoint import build_from_folder

        model, _ = build_from_folder(ckpt)
        if tokenizer is not None:
            model.tokenizer = tokenizer
        elif model.tokenizer is None:
            raise ValueError(f"{ckpt} holds no tokenizer: pass tokenizer=DIR")
        return model, f"folder {ckpt}"

    model_cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    model_cfg.vqvae.validate()
    if tokenizer is None and model_cfg.tokenizer is not None:
        tokenizer = load_tokenizer(model_cfg.tokenizer)
    if tokenizer is None:
        if ckpt is not None:
            raise ValueError(f"no tokenizer for {ckpt}: pass tokenizer=DIR or set model.tokenizer")
        tokenizer = throwaway_tokenizer(out_dir)
    model = build_vargpt(model_cfg, tokenizer)
    if ckpt is None:
        log.warning("ckpt=null: the %s model has random weights (a smoke test, not a real model)", model_cfg.name)
        return model, f"random {model_cfg.name}"
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such file or folder")
    from vargpt.checkpoint import load_weights

    load_weights(model, ckpt, strict=True)
    return model, f"{model_cfg.name} weights from {ckpt}"


def run(cfg: DictConfig) -> Path:
    """Load, generate, write PNGs and the manifest; returns the manifest's path."""
    from vargpt.model.sampling_config import SamplingConfig
    from vargpt.model.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER

    sampling = SamplingConfig.coerce(cfg.sampling)
    if cfg.n < 1:
        raise ValueError(f"n must be >= 1, got {cfg.n}")
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str(cfg.device))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if str(cfg.dtype) not in dtypes:
        raise ValueError(f"dtype={cfg.dtype}: expected one of {', '.join(dtypes)}")
    dtype = dtypes[str(cfg.dtype)]
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
    outputs = model.generate([prompt] * cfg.n, images=images, sampling=sampling, force_image=force, system=cfg.system)

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


register_resolvers()  # ${vargpt_repo:} in conf/model


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> str:
    return str(run(cfg))


if __name__ == "__main__":
    main()
