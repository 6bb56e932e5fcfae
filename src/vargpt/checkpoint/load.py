"""``load_weights(model, source)``: the one entry the training app calls for ``model.init_from``.

``source`` may be

* a released VARGPT_LLaVA-v1 folder, or a folder we exported (``export_released`` or the training app's
  export: ``model.safetensors`` + ``model_config.yaml``), or a checkpoint file of a whole VARGPT (safetensors,
  ``.pth``, a Lightning ``.ckpt`` whose ``state_dict`` is nested and prefixed);
* the stage-1 triple: a dict ``{"llava": DIR, "var": PATH, "vqvae": PATH}`` (any subset), or the same as one
  string ``"llava=DIR,var=PATH,vqvae=PATH"`` (what a YAML ``init_from`` can hold);
* a llava-hf folder alone (config.json ``model_type: llava``), a VAR ``.pth`` or a VQ-VAE ``.pth``: for a
  VARGPT these are the corresponding part of the stage-1 triple; for a :class:`VAR` / :class:`VQVAE` model
  (the class-conditional recipes) they load the whole model. A whole-VARGPT source also loads into a VAR or a
  VQVAE (its ``vargpt_gen.*`` / ``vae_local.*`` part);
* a ``{key: tensor}`` dict.

Every load logs its :class:`LoadReport` (logger ``vargpt.checkpoint``, INFO) and returns it; ``strict=True`` (the
default) raises :class:`CheckpointMismatchError` naming every offending key before the model is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vargpt.checkpoint.io import MemorySource, TensorSource, open_checkpoint, subset
from vargpt.checkpoint.llava_var_init import COMPONENTS, load_stage1
from vargpt.checkpoint.match import DEFAULT_RULES, Target, apply_load, plan_load
from vargpt.checkpoint.released import (
    as_released,
    folder_model_config,
    folder_special_ids,
    folder_tokenizer_or_none,
    is_released_folder,
)
from vargpt.checkpoint.released_config import read_config_json, special_ids_conflicts
from vargpt.checkpoint.report import CheckpointMismatchError, LoadReport
from vargpt.checkpoint.var_io import (
    VAR_HEADS,
    VQVAE_HEADS,
    is_var_state,
    is_vqvae_state,
    load_var,
    load_vqvae,
    unwrapped,
)
from vargpt.model.var import VAR
from vargpt.model.vargpt import VARGPT, build_vargpt
from vargpt.model.vqvae import VQVAE

log = logging.getLogger("vargpt.checkpoint")


def parse_components(source: Any) -> dict[str, str] | None:
    """The stage-1 triple from a dict or a ``"llava=DIR,var=PATH,vqvae=PATH"`` string; None if not one."""
    if isinstance(source, Mapping):
        if source and all(isinstance(v, str | Path) or v is None for v in source.values()):
            unknown = set(source) - set(COMPONENTS)
            if unknown:
                raise ValueError(f"init_from components {sorted(unknown)}: expected any of {COMPONENTS}")
            return {k: str(v) for k, v in source.items() if v is not None}
        return None
    if isinstance(source, str) and "=" in source and not Path(source).exists():
        out = {}
        for part in source.split(","):
            name, sep, path = part.partition("=")
            if not sep or name.strip() not in COMPONENTS:
                raise ValueError(f"init_from={source!r}: expected 'llava=DIR,var=PATH,vqvae=PATH' (any subset)")
            out[name.strip()] = path.strip()
        return out
    return None


def detect_kind(source: TensorSource) -> str:
    """'vargpt' | 'llava' | 'var' | 'vqvae' | 'unknown', from the key names."""
    names, _ = as_released(source)
    heads = {k.split(".", 1)[0] for k in names}
    if heads & {"vargpt_gen", "vae_local", "image_gen_projector", "image_gen_projector_out"}:
        return "vargpt"
    if heads and heads <= {"vision_tower", "multi_modal_projector", "language_model"}:
        return "llava"
    if is_var_state(unwrapped(source, VAR_HEADS)):
        return "var"
    if is_vqvae_state(unwrapped(source, VQVAE_HEADS)):
        return "vqvae"
    return "unknown"


def load_weights(
    model: nn.Module,
    source: Any,
    strict: bool = True,
    *,
    log_fn: Callable[[str], None] | None = None,
) -> LoadReport:
    """Load ``source`` (see the module docstring) into ``model`` (a VARGPT, VAR or VQVAE); returns the report.

    Call before wrapping the model with FSDP/DDP. The model may be on the meta device (tensors are assigned).
    """
    if log_fn is None:
        # Printed even where logging is not configured (a notebook, a script): every load shows its report.
        log_fn = log.info if log.isEnabledFor(logging.INFO) else print
    try:
        report = _load(model, source, strict, VARGPT, VAR, VQVAE)
    except CheckpointMismatchError as err:
        log_fn(err.report.format())
        raise
    log_fn(report.format())
    return report


def _load(model: nn.Module, source: Any, strict: bool, VARGPT: type, VAR: type, VQVAE: type) -> LoadReport:
    comps = parse_components(source)
    if comps is not None:
        if not isinstance(model, VARGPT):
            raise TypeError(f"the llava/var/vqvae triple initialises a VARGPT, not a {type(model).__name__}")
        return load_stage1(model, strict=strict, **comps)

    folder_config: dict[str, Any] | None = None
    if isinstance(source, Mapping):
        src: TensorSource = MemorySource(source)
    else:
        path = Path(source).expanduser()
        config = read_config_json(path) if path.is_dir() and (path / "config.json").is_file() else None
        if config is not None and config.get("model_type") == "llava" and isinstance(model, VARGPT):
            return load_stage1(model, llava=path, strict=strict)
        if config is not None and is_released_folder(path):
            folder_config = config
        src = open_checkpoint(path)

    kind = detect_kind(src)
    if isinstance(model, VARGPT):
        if kind in ("var", "vqvae", "llava"):
            return load_stage1(model, strict=strict, **{kind: src})
        return _load_full(model, src, strict, folder_config)
    if isinstance(model, VAR):
        if kind == "vargpt":
            named, how = as_released(src)
            return _with_mapping(load_var(model, subset(named, "vargpt_gen."), strict), how)
        return load_var(model, src, strict)
    if isinstance(model, VQVAE):
        if kind == "vargpt":
            named, how = as_released(src)
            return _with_mapping(load_vqvae(model, subset(named, "vae_local."), strict), how)
        return load_vqvae(model, src, strict)
    # Any other module: a plain strict state-dict load with the report.
    report = plan_load(Target.of(model), src, DEFAULT_RULES, target_label=type(model).__name__)
    report.raise_if_strict(strict)
    return apply_load(model, src, report)


def _load_full(
    model: nn.Module, source: TensorSource, strict: bool, folder_config: dict[str, Any] | None
) -> LoadReport:
    named, report = _plan_full(model, source, strict, folder_config)
    return apply_load(model, named, report)


def _plan_full(
    model: nn.Module, source: TensorSource, strict: bool, folder_config: dict[str, Any] | None
) -> tuple[TensorSource, LoadReport]:
    """``source`` under the released names and the report of loading it whole into ``model`` (nothing read)."""
    named, how = as_released(source)
    report = plan_load(Target.of(model), named, DEFAULT_RULES, source_label=source.label, target_label="VARGPT")
    report.key_mapping = how
    if folder_config is not None and getattr(model, "ids", None) is not None:
        report.conflicts += special_ids_conflicts(folder_config, model.ids)
    report.raise_if_strict(strict)
    return named, report


def plan_whole_load(model: VARGPT, source: str | Path | TensorSource) -> tuple[TensorSource, LoadReport] | None:
    """For a load shard by shard (``vargpt.checkpoint.sharded_load``): the released-name view of a whole-VARGPT
    ``source`` (a released or exported folder, a safetensors or torch file, an open source) and the strict report
    of loading it into ``model``, which may be on the meta device (only headers are read). None when ``source``
    is another kind ``load_weights`` reads (the stage-1 triple, a LLaVA, VAR or VQ-VAE part alone), which fills
    only part of the model. Raises :class:`CheckpointMismatchError` as ``load_weights`` would."""
    folder_config: dict[str, Any] | None = None
    if not isinstance(source, TensorSource):
        if parse_components(source) is not None:
            return None
        path = Path(source).expanduser()
        config = read_config_json(path) if path.is_dir() and (path / "config.json").is_file() else None
        if config is not None and config.get("model_type") == "llava":
            return None
        if config is not None and is_released_folder(path):
            folder_config = config
        source = open_checkpoint(path)
    if detect_kind(source) != "vargpt":
        return None
    return _plan_full(model, source, True, folder_config)


def _with_mapping(report: LoadReport, how: str | None) -> LoadReport:
    report.key_mapping = how
    return report


def build_from_folder(
    folder: str | Path, strict: bool = True, device: str | torch.device | None = None
) -> tuple[nn.Module, LoadReport]:
    """Build our VARGPT for a released / exported folder (config, tokenizer) and load its weights into it.

    ``device="meta"`` builds without allocating and assigns the checkpoint's tensors (cast to fp32), which is the
    fast way to get a 9 B model into memory.
    """
    folder = Path(folder)
    cfg = folder_model_config(folder)
    tokenizer = folder_tokenizer_or_none(folder)
    ids = folder_special_ids(folder, tokenizer)
    with torch.device(device) if device is not None else nullcontext():
        model = build_vargpt(cfg, tokenizer if tokenizer is not None else ids)
    report = load_weights(model, folder, strict=strict)
    if device is not None and torch.device(device).type == "meta":
        left = materialise_nonpersistent_buffers(model)
        if left:
            report.notes.append(f"non-persistent buffers still on the meta device: {left}")
    return model, report


@torch.no_grad()
def materialise_nonpersistent_buffers(model: nn.Module, device: str | torch.device = "cpu") -> list[str]:
    """Recompute the buffers no checkpoint holds (rotary ``inv_freq``, CLIP ``position_ids``) of a model built on
    the meta device: each owning transformers module is rebuilt from its ``config`` on ``device`` and its
    non-persistent buffers are taken over. Returns the names it could not recompute."""
    persistent = set(model.state_dict())
    owners: dict[str, nn.Module] = {}
    for name, buf in model.named_buffers():
        if buf.is_meta and name not in persistent:
            owners.setdefault(name.rpartition(".")[0], model.get_submodule(name.rpartition(".")[0]))
    left = []
    for owner_name, owner in owners.items():
        config = getattr(owner, "config", None)
        try:
            with torch.device(device):
                fresh = type(owner)(config)
        except Exception:  # not rebuildable from a config: reported, not fatal
            left += [f"{owner_name}.{n}" for n, b in owner.named_buffers(recurse=False) if b.is_meta]
            continue
        for n, b in fresh.named_buffers(recurse=False):
            if getattr(owner, n).is_meta:
                owner.register_buffer(n, b, persistent=False)
    return left
