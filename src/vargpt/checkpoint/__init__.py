"""Checkpoint interop: load the released VARGPT / LLaVA / VAR / VQ-VAE weights, export ours in their layouts.

* :func:`load_weights` — the training app's ``model.init_from``: a released or exported folder, the stage-1
  LLaVA + VAR + VQ-VAE triple, a VAR or VQ-VAE ``.pth``, a Lightning checkpoint; prints and returns a
  :class:`LoadReport`; strict by default.
* :func:`export_released`, :func:`export_var`, :func:`export_vqvae` — a trained model in the released layouts.
* ``python -m vargpt.convert`` — the same, folder to folder (see ``vargpt/convert.py``).

Weights are read only with safetensors or ``torch.load(weights_only=True)``; tokenizers with
``trust_remote_code=False``. See docs/checkpoints.md.
"""

from vargpt.checkpoint.io import (
    CheckpointFormatError,
    CorruptCheckpointError,
    TensorSource,
    UnsafeCheckpointError,
    open_checkpoint,
    read_state_dict,
)
from vargpt.checkpoint.llava_var_init import init_stage1, load_stage1, prepare_stage1_tokenizer
from vargpt.checkpoint.load import build_from_folder, detect_kind, load_weights
from vargpt.checkpoint.released import export_released, released_key_names
from vargpt.checkpoint.released_config import model_config_from_released, released_config, special_ids_from_released
from vargpt.checkpoint.report import CheckpointMismatchError, LoadReport
from vargpt.checkpoint.var_io import export_var, export_vqvae, load_var, load_vqvae, var_kwargs_from_checkpoint

__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "LoadReport",
    "TensorSource",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "build_from_folder",
    "detect_kind",
    "export_released",
    "export_var",
    "export_vqvae",
    "init_stage1",
    "load_stage1",
    "load_var",
    "load_vqvae",
    "load_weights",
    "model_config_from_released",
    "open_checkpoint",
    "prepare_stage1_tokenizer",
    "read_state_dict",
    "released_config",
    "released_key_names",
    "special_ids_from_released",
    "var_kwargs_from_checkpoint",
]
