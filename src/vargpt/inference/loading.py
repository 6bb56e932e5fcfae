"""The one way to load a VARGPT to run it: ``src/generate.py``, ``src/eval.py`` (``vargpt.eval.runner``), the
notebooks and ``bench/`` all call :func:`load_model` with their Hydra config's ``ckpt`` / ``tokenizer`` / ``model``
/ ``seed`` / ``paths`` keys, then place it on :func:`resolve_device` of their ``device`` key.

``ckpt`` may be:

* an exported or released model folder (its config and tokenizer inside), or a training run folder (its
  ``export/``);
* a checkpoint file (Lightning ``.ckpt``, ``.safetensors``, ``.pth``) of the ``model`` config, with ``tokenizer``,
  ``model.tokenizer`` or the shapes world's tokenizer;
* null: the ``model`` config with random weights seeded by ``seed`` (the same model every run: smoke tests and
  resumable evaluations), with the world's tokenizer or a throwaway one trained on a slice of the world's text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vargpt.checkpoint import build_from_folder, load_weights
from vargpt.checkpoint.released import MODEL_CONFIG_FILE
from vargpt.data.shapes import split_counts, world_texts
from vargpt.data.tokenizer import load_tokenizer, train_world_tokenizer
from vargpt.model.config import ModelConfig
from vargpt.model.vargpt import build_vargpt

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; any other name is taken as it is (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def world_tokenizer(cfg: DictConfig, out_dir: Path | None) -> Any:
    """The shapes world's tokenizer when the world is built (``<paths.data_dir>/shapes/tokenizer``); else, with
    an ``out_dir``, a throwaway one trained on a slice of the world's text (random models only), else None."""
    world = Path(str(cfg.paths.data_dir)) / "shapes" / "tokenizer"
    if world.is_dir():
        log.info("tokenizer: the shapes world's, %s", world)
        return load_tokenizer(world)
    if out_dir is None:
        return None
    return train_world_tokenizer(world_texts(split_counts(400), seed=0), out_dir / "tokenizer", vocab_size=1000)


def load_model(cfg: DictConfig, out_dir: Path) -> tuple[torch.nn.Module, str]:
    """The model of ``cfg.ckpt`` (see the module docstring) on the CPU, and a description of it for logs and
    manifests. ``out_dir`` receives a throwaway tokenizer when a random model needs one."""
    ckpt = None if cfg.ckpt is None else Path(str(cfg.ckpt)).expanduser()
    tokenizer = None if cfg.get("tokenizer") is None else load_tokenizer(cfg.tokenizer)
    if ckpt is not None and ckpt.is_dir() and (ckpt / "export").is_dir():
        ckpt = ckpt / "export"  # a training run folder
    if ckpt is not None and ckpt.is_dir():
        check_model_folder(ckpt)
        model, _ = build_from_folder(ckpt)
        model.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if model.tokenizer is None:
            raise ValueError(f"ckpt={ckpt} holds no tokenizer: pass tokenizer=DIR")
        return model, f"folder {ckpt}"
    model_cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    model_cfg.vqvae.validate()
    if tokenizer is None and model_cfg.tokenizer:
        tokenizer = load_tokenizer(model_cfg.tokenizer)
    if ckpt is None:
        tokenizer = tokenizer if tokenizer is not None else world_tokenizer(cfg, out_dir)
        torch.manual_seed(int(cfg.get("seed", 0)))  # the same random model every run (resumable smoke tests)
        model = build_vargpt(model_cfg, tokenizer)
        log.warning("ckpt=null: the %s model has random weights (a smoke test, not a real model)", model_cfg.name)
        return model, f"random {model_cfg.name}"
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such file or folder")
    tokenizer = tokenizer if tokenizer is not None else world_tokenizer(cfg, None)
    if tokenizer is None:
        raise ValueError(f"no tokenizer for ckpt={ckpt}: pass tokenizer=DIR or set model.tokenizer")
    model = build_vargpt(model_cfg, tokenizer)
    load_weights(model, ckpt, strict=True)
    return model, f"{model_cfg.name} weights from {ckpt}"


def check_model_folder(folder: Path) -> None:
    """Refuse a ``ckpt`` folder that holds no model (no ``model_config.yaml``, no ``config.json``), naming the next
    step: a training run folder whose export is missing (its training stopped before the export, or the export
    was deleted), or an unknown folder."""
    if (folder / MODEL_CONFIG_FILE).is_file() or (folder / "config.json").is_file():
        return
    if (folder / "checkpoints").is_dir():
        checkpoints = sorted((folder / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
        files = f" (newest: {checkpoints[-1]})" if checkpoints else " (it holds no .ckpt file)"
        raise FileNotFoundError(
            f"ckpt={folder} is a training run folder without an export/ folder: its training has not finished "
            f"exporting. Rerun the training command of this run to finish it (it writes {folder / 'export'}), or "
            f"evaluate a checkpoint file of {folder / 'checkpoints'}{files} with ckpt=<that file> and the run's "
            "model=<model config>"
        )
    raise FileNotFoundError(
        f"ckpt={folder} is neither an exported or released model folder ({MODEL_CONFIG_FILE} or config.json) nor a "
        "training run folder (export/): pass one of those, or a checkpoint file"
    )
