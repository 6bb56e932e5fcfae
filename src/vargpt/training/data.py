"""The training app's side of the data: the tokenizer a run uses and the data module that feeds it.

The tokenizer is needed before the model (the model sizes its class embedding by the generation token ids),
and the shapes world holds its own tokenizer, so the world is built first. With torchrun or SLURM every rank
starts at once: only local rank 0 builds, the others wait for the world's manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vargpt.data.config import resolve_path
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.tokenizer import load_tokenizer


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for local rank 0 to build {path}")
        time.sleep(2.0)


def build_data(data: DictConfig, model: DictConfig) -> tuple[Any, VARGPTDataModule]:
    """(tokenizer, data module) of a run from its ``data`` and ``model`` sections: ``model.tokenizer`` if set,
    else the shapes world's own."""
    datamodule = VARGPTDataModule.from_config(data, OmegaConf.to_object(model))
    shapes = datamodule.cfg.shapes
    if shapes is not None:
        world = resolve_path(shapes.dir, datamodule.cfg.root)
        if _local_rank() == 0:
            datamodule.prepare_data()
        else:
            _wait_for(world / "manifest.json")
    if model.tokenizer:
        tokenizer = load_tokenizer(model.tokenizer)
    elif shapes is not None:
        tokenizer = load_tokenizer(world / "tokenizer")
    else:
        raise ValueError("no tokenizer: set model.tokenizer to the LLM checkpoint's local tokenizer folder")
    datamodule.tokenizer = tokenizer
    return tokenizer, datamodule
