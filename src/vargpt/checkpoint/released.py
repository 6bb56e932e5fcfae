"""The released VARGPT_LLaVA-v1 folder <-> our model: key names, weights, tokenizer and processor files.

Our ``VARGPT.state_dict()`` already uses the released key names (VARGPT-REFERENCE.md 7.1), so weights need no
renaming; :func:`released_key_names` is the one place where other spellings of the same weights are mapped onto
them (newer llava-hf saves, DDP/compile/Lightning prefixes). The rest of this module reads and writes the folder:

* ``config.json``, ``generation_config.json`` and the processor configs, translated by
  :mod:`vargpt.checkpoint.released_config`;
* the tokenizer files (32005 tokens in the release), copied or saved;
* ``model.safetensors`` or shards + ``model.safetensors.index.json``, bf16 in the release.

An exported folder also holds ``model_config.yaml`` (our full ModelConfig, as the training app's exports do),
so that a folder we wrote rebuilds exactly; the official code ignores it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from vargpt.checkpoint.io import (
    DEFAULT_MAX_SHARD_BYTES,
    MemorySource,
    RenamedSource,
    TensorSource,
    open_checkpoint,
    write_safetensors,
)
from vargpt.checkpoint.released_config import (
    MODEL_TYPE,
    generation_config,
    model_config_from_released,
    parse_dtype,
    processor_configs,
    read_config_json,
    released_config,
    special_ids_from_released,
)
from vargpt.model.config import ModelConfig, load_model_config
from vargpt.tokens import SpecialTokenIds

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.yaml"
# The released model's top-level sub-modules (the first name of every key).
TOP_MODULES = (
    "vision_tower",
    "multi_modal_projector",
    "language_model",
    "vae_local",
    "vargpt_gen",
    "image_gen_projector",
    "image_gen_projector_out",
)
LLAVA_MODULES = ("vision_tower", "multi_modal_projector", "language_model")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


# ---------------------------------------------------------------------------------------------- key names
_NEW_LLAVA = (
    "llava-hf layout of transformers>=4.52 (model.language_model.*, model.vision_tower.*, "
    "model.multi_modal_projector.*, lm_head.*) -> released names"
)


def released_key_names(keys: Iterable[str]) -> tuple[dict[str, str], str | None]:
    """The one key adapter: ``{released name: checkpoint name}`` for a checkpoint of (part of) VARGPT/LLaVA,
    and a description of what was renamed (None when the names already are the released ones).

    Handled spellings:

    * wrapper prefixes shared by every key (``module.`` of DDP, ``_orig_mod.`` of torch.compile, the attribute
      of a LightningModule such as ``model.``);
    * the llava-hf layout of transformers >= 4.52 (``LlavaForConditionalGeneration`` holding a ``LlavaModel``):
      ``model.language_model.X`` -> ``language_model.model.X``, ``model.vision_tower.X`` -> ``vision_tower.X``,
      ``model.multi_modal_projector.X`` -> ``multi_modal_projector.X``, ``lm_head.X`` -> ``language_model.lm_head.X``
      (older llava-hf files and the VARGPT release use the right-hand names).
    """
    keys = list(keys)
    out: dict[str, str] = {}
    changes: dict[str, None] = {}
    for key in keys:
        name = key
        for wrapper in ("module.", "_orig_mod."):
            while name.startswith(wrapper):
                name = name[len(wrapper) :]
                changes[f"wrapper prefix '{wrapper}' removed"] = None
        head = name.split(".", 1)[0]
        if head not in (*TOP_MODULES, "model", "lm_head") and all(k.startswith(head + ".") for k in keys):
            name = name[len(head) + 1 :]
            changes[f"wrapper prefix '{head}.' removed"] = None
        if name.startswith("model.") and name.split(".", 2)[1] in TOP_MODULES:
            inner = name[len("model.") :]
            if inner.startswith("language_model.") and not inner.startswith(
                ("language_model.model.", "language_model.lm_head.")
            ):
                name = "language_model.model." + inner[len("language_model.") :]
                changes[_NEW_LLAVA] = None
            else:
                name = inner
                changes["prefix 'model.' removed"] = None  # merged into _NEW_LLAVA below when both occur
        elif name.startswith("lm_head."):
            name = "language_model." + name
            changes[_NEW_LLAVA] = None
        elif name.startswith("language_model.") and not name.startswith(
            ("language_model.model.", "language_model.lm_head.")
        ):
            name = "language_model.model." + name[len("language_model.") :]
            changes["LlavaModel layout (language_model.layers.*) -> released"] = None
        if name in out:
            raise ValueError(f"checkpoint keys {out[name]!r} and {key!r} both map to {name!r}")
        out[name] = key
    if _NEW_LLAVA in changes:
        changes.pop("prefix 'model.' removed", None)
    return out, ("; ".join(changes) or None)


def as_released(source: TensorSource) -> tuple[TensorSource, str | None]:
    """``source`` viewed under the released key names (see :func:`released_key_names`)."""
    names, how = released_key_names(source)
    if how is None:
        return source, None
    return RenamedSource(source, names), how


# ---------------------------------------------------------------------------------------------- folders
def is_released_folder(path: str | Path) -> bool:
    """A folder with a VARGPT config.json, or one of our exports (``model_config.yaml`` + weights)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MODEL_CONFIG_FILE).is_file():
        return True
    cfg = p / "config.json"
    return cfg.is_file() and read_config_json(cfg).get("model_type") == MODEL_TYPE


def folder_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in ``folder`` (or its ``tokenizer/`` sub-folder), or None when there is none.

    Loaded with ``local_files_only=True`` and ``trust_remote_code=False``: a tokenizer that needs custom code is
    refused, never run.
    """
    for d in (Path(folder), Path(folder) / "tokenizer"):
        if (
            (d / "tokenizer.json").is_file()
            or (d / "tokenizer_config.json").is_file()
            or (d / "tokenizer.model").is_file()
        ):
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    return None


def folder_tokenizer_or_none(folder: str | Path) -> Any:
    """:func:`folder_tokenizer`, but a tokenizer that cannot be read (e.g. a sentencepiece-only one without the
    sentencepiece package) is a warning and None: the special ids then come from config.json."""
    try:
        return folder_tokenizer(folder)
    except (OSError, ValueError, ImportError, TypeError) as err:
        log.warning("%s: tokenizer not readable (%s: %s); using config.json's ids", folder, type(err).__name__, err)
        return None


def folder_model_config(folder: str | Path) -> ModelConfig:
    """Our ModelConfig of a folder: its ``model_config.yaml`` when we wrote it, else from its config.json."""
    folder = Path(folder)
    if (folder / MODEL_CONFIG_FILE).is_file():
        cfg = load_model_config(folder / MODEL_CONFIG_FILE)
        cfg.tokenizer, cfg.init_from = None, None
        return cfg
    cfg = model_config_from_released(read_config_json(folder), name=folder.name)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():  # the image normalisation lives in the processor config, not in config.json
        values = json.loads(pre.read_text())
        if "image_mean" in values and "image_std" in values:
            cfg.vision.image_mean = tuple(float(x) for x in values["image_mean"])
            cfg.vision.image_std = tuple(float(x) for x in values["image_std"])
    return cfg


def folder_special_ids(folder: str | Path, tokenizer: Any = None) -> SpecialTokenIds:
    folder = Path(folder)
    config = read_config_json(folder) if (folder / "config.json").is_file() else {}
    tokenizer = tokenizer if tokenizer is not None else folder_tokenizer_or_none(folder)
    if tokenizer is None and not config:
        raise ValueError(f"{folder}: neither a tokenizer nor a config.json to read the special token ids from")
    return special_ids_from_released(config, tokenizer)


def write_released_folder(
    out_dir: str | Path,
    source: TensorSource,
    cfg: ModelConfig,
    ids: SpecialTokenIds,
    dtype: torch.dtype | None = torch.bfloat16,
    tokenizer: Any = None,
    copy_from: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a VARGPT_LLaVA folder: weights (``dtype``; None keeps each tensor's), config.json,
    generation_config.json, tokenizer, processor configs and our ``model_config.yaml``.

    ``copy_from`` (the folder converted from) provides the tokenizer and processor files verbatim and the
    fields of config.json / generation_config.json this package does not own; otherwise they are generated
    (the tokenizer from ``tokenizer``; without one the folder has no tokenizer files, and a warning says so).
    """
    from omegaconf import OmegaConf  # optional where models are only loaded (the GPU image has no omegaconf)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src_dir = Path(copy_from) if copy_from is not None else None
    if src_dir is not None and src_dir.resolve() == out.resolve():
        raise ValueError(f"refusing to convert {src_dir} onto itself; choose another --out")
    write_safetensors(source, out, dtype=dtype, max_shard_size=max_shard_size)
    stored = dtype or _dominant_dtype(source)

    base_cfg = read_config_json(src_dir) if src_dir is not None and (src_dir / "config.json").is_file() else None
    _write_json(out / "config.json", released_config(cfg, ids, stored, base=base_cfg))
    base_gen = None
    if src_dir is not None and (src_dir / "generation_config.json").is_file():
        base_gen = json.loads((src_dir / "generation_config.json").read_text())
    _write_json(out / "generation_config.json", generation_config(ids, base=base_gen))

    copied_tok = False
    if src_dir is not None:
        for d in (src_dir, src_dir / "tokenizer"):
            names = [n for n in TOKENIZER_FILES if (d / n).is_file()]
            for n in names:
                shutil.copyfile(d / n, out / n)
            if names:
                copied_tok = True
                break
    if not copied_tok:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        else:
            log.warning("%s: no tokenizer given; the folder has no tokenizer files (pass tokenizer=...)", out)
    generated = processor_configs(cfg)
    for name in PROCESSOR_FILES:
        if src_dir is not None and (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out / name)
        else:
            _write_json(out / name, generated[name])
    cfg_out = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})
    cfg_out.tokenizer = cfg_out.init_from = str(out.resolve())
    (out / MODEL_CONFIG_FILE).write_text(
        "# Our ModelConfig of this folder (the official code ignores this file). Load it with\n"
        "# vargpt.model.load_model_config; tokenizer and init_from point at this folder.\n"
        + OmegaConf.to_yaml(OmegaConf.structured(cfg_out))
    )
    return out


def export_released(
    model: Any,
    out_dir: str | Path,
    dtype: str | torch.dtype = "bf16",
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (a VARGPT of any size or stage) as a VARGPT_LLaVA-v1 folder that the official code and
    :func:`vargpt.checkpoint.load_weights` read back; ``dtype`` 'bf16' as the release, or 'fp32' (lossless).

    The tokenizer is ``tokenizer``, else the model's own (``model.tokenizer``). Call on the full (unsharded)
    model; under FSDP gather a full state dict first and use :func:`write_released_folder`.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return write_released_folder(
        out_dir,
        MemorySource(state, label=f"{type(model).__name__} state_dict"),
        model.cfg,
        model.ids,
        dtype=parse_dtype(dtype),
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
    )


# ---------------------------------------------------------------------------------------------- helpers


def _dominant_dtype(source: TensorSource) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for k in source:
        dt = source.dtype(k)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + source.numel(k)
    return max(counts, key=counts.get) if counts else torch.float32


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def open_released_weights(folder: str | Path) -> tuple[TensorSource, str | None]:
    """The weights of a released (or llava-hf, or our exported) folder under the released key names."""
    return as_released(open_checkpoint(folder))
