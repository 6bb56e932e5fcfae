"""Folder-to-folder conversions, checked against our model built on the meta device (no weights in memory
beyond one shard): released / exported / Lightning checkpoint -> released layout, -> VAR .pth, -> VQ-VAE .pth.

The checkpoint's tensors are copied byte for byte (or cast once, when a dtype is asked for); nothing passes
through a model, so a conversion is exact and a 9 B folder converts with a few GB of memory. Keys the model
recomputes (deterministic buffers, the unused ``ln_q``) that a source lacks are filled with the model's values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vargpt.checkpoint.io import (
    DEFAULT_MAX_SHARD_BYTES,
    TensorSource,
    open_checkpoint,
    save_torch_state_dict,
    subset,
)
from vargpt.checkpoint.load import detect_kind
from vargpt.checkpoint.match import DEFAULT_RULES, Target, plan_load
from vargpt.checkpoint.released import (
    as_released,
    folder_model_config,
    folder_special_ids,
    folder_tokenizer,
    folder_tokenizer_or_none,
    write_released_folder,
)
from vargpt.checkpoint.released_config import read_config_json, special_ids_conflicts
from vargpt.checkpoint.report import LoadReport
from vargpt.checkpoint.var_io import (
    VAR_HEADS,
    VQVAE_HEADS,
    _save,
    is_vqvae_state,
    unwrapped,
    var_kwargs_from_checkpoint,
)
from vargpt.model.config import ModelConfig, load_model_config
from vargpt.model.var import VAR
from vargpt.model.vargpt import build_vargpt
from vargpt.tokens import SpecialTokenIds

log = logging.getLogger("vargpt.checkpoint")


def resolve_model(
    in_path: str | Path, config: str | Path | None = None, tokenizer: str | Path | None = None
) -> tuple[ModelConfig, SpecialTokenIds, Any]:
    """(ModelConfig, special ids, tokenizer or None) of a source: from ``config``/``tokenizer`` when given, else
    from the folder (``model_config.yaml`` or ``config.json``; its tokenizer)."""

    in_path = Path(in_path)
    folder = in_path if in_path.is_dir() else None
    if config is not None:
        cfg = load_model_config(config)
    elif folder is not None:
        cfg = folder_model_config(folder)
    else:
        raise ValueError(f"{in_path} is a file: pass --config (the model YAML) to say what model it holds")
    tok_dir = tokenizer or (cfg.tokenizer if config is not None else None)
    tok = folder_tokenizer(tok_dir) if tok_dir else (folder_tokenizer_or_none(folder) if folder is not None else None)
    if tok is not None:
        ids = SpecialTokenIds.from_tokenizer(tok)
    elif folder is not None:
        ids = folder_special_ids(folder)
    else:
        raise ValueError(f"{in_path}: pass --tokenizer (a folder with the five special tokens) to know the token ids")
    return cfg, ids, tok


def check_source(
    in_path: str | Path, cfg: ModelConfig, ids: SpecialTokenIds, strict: bool = True
) -> tuple[TensorSource, LoadReport, Any]:
    """Open ``in_path`` under the released names and match it against a meta-device VARGPT of ``cfg``."""
    with torch.device("meta"):
        model = build_vargpt(cfg, ids)
    src, how = as_released(open_checkpoint(in_path))
    report = plan_load(Target.of(model), src, DEFAULT_RULES, target_label=f"VARGPT ({cfg.name})")
    report.key_mapping = how
    in_path = Path(in_path)
    if in_path.is_dir() and (in_path / "config.json").is_file():
        report.conflicts += special_ids_conflicts(read_config_json(in_path), ids)
    report.raise_if_strict(strict)
    return src, report, model


def filled_source(src: TensorSource, report: LoadReport, model: Any) -> TensorSource:
    """The model's full state dict, in model order: the checkpoint's tensors where loaded, the model's own
    values for the keys a rule accepted (deterministic buffers, ``ln_q``, usage statistics)."""
    computed = _computed_values(model)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key in Target.of(model).layout:
        if key in report.loaded:
            names[key] = key
        elif key in report.initialised:
            if key not in computed:
                raise ValueError(f"{key}: no value in the checkpoint and none computable without building the model")
            tensors[key] = computed[key]
    return _Merged(src, names, tensors)


def convert_to_released(
    in_path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    strict: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    echo: Callable[[str], None] = print,
) -> LoadReport:
    """Any whole-VARGPT checkpoint -> a VARGPT_LLaVA folder (tokenizer and processor files copied verbatim
    from a source folder, generated otherwise)."""
    _refuse_overwrite(in_path, out_dir)
    cfg, ids, tok = resolve_model(in_path, config, tokenizer)
    src, report, model = check_source(in_path, cfg, ids, strict)
    echo(report.format())
    in_path = Path(in_path)
    write_released_folder(
        out_dir,
        filled_source(src, report, model),
        cfg,
        ids,
        dtype=dtype,
        tokenizer=tok,
        copy_from=in_path if in_path.is_dir() else None,
        max_shard_size=max_shard_size,
    )
    return report


def convert_to_part(
    in_path: str | Path,
    out_path: str | Path,
    part: str,
    dtype: torch.dtype | None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    strict: bool = True,
    echo: Callable[[str], None] = print,
) -> LoadReport:
    """The VAR decoder (``part='var'``) or the VQ-VAE (``part='vqvae'``) of a whole-VARGPT checkpoint as a VAR-style
    state dict file (``.pth``, or ``.safetensors`` by suffix). A VAR/VQ-VAE checkpoint is re-written as is."""
    _refuse_overwrite(in_path, out_path)
    prefix = {"var": "vargpt_gen.", "vqvae": "vae_local."}[part]
    raw = open_checkpoint(in_path)
    kind = detect_kind(raw)
    if kind == "vargpt" and (config is not None or Path(in_path).is_dir()):
        cfg, ids, _ = resolve_model(in_path, config, tokenizer)
        full, report, model = check_source(in_path, cfg, ids, strict)
        src = subset(filled_source(full, report, model), prefix)
    elif kind == "vargpt":  # a bare checkpoint file: check the part against itself
        src = subset(as_released(raw)[0], prefix)
        report = _check_part(src, part, strict)
    elif kind == part:
        src = unwrapped(raw, VAR_HEADS if part == "var" else VQVAE_HEADS)
        report = _check_part(src, part, strict)
    else:
        raise ValueError(f"{in_path}: a {kind} checkpoint holds no {part} weights")
    echo(report.format())
    out_path = Path(out_path)
    state = {k: src[k] for k in src}
    if out_path.name.endswith(".safetensors"):
        _save(state, out_path, dtype)
    else:
        save_torch_state_dict(state, out_path, dtype=dtype)
    return report


# ---------------------------------------------------------------------------------------------- helpers
def _refuse_overwrite(in_path: str | Path, out_path: str | Path) -> None:
    """The output must not be, or hold, the input (shards are rewritten while the input is still being read)."""
    src, out = Path(in_path).resolve(), Path(out_path).resolve()
    if src == out or (src.is_file() and src.parent == out):
        raise ValueError(f"--out {out_path} would overwrite the input {in_path}; choose another output")


class _Merged(TensorSource):
    """Checkpoint tensors (``names``: key -> source key) plus computed ones, in one key order."""

    def __init__(self, src: TensorSource, names: dict[str, str], computed: dict[str, torch.Tensor]) -> None:
        self.src, self.names, self.computed = src, names, computed
        self.label = src.label
        self._order = [k for k in {**names, **computed}]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.computed[key] if key in self.computed else self.src[self.names[key]]

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.computed[key].shape) if key in self.computed else self.src.shape(self.names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.computed[key].dtype if key in self.computed else self.src.dtype(self.names[key])


def _computed_values(model: Any) -> dict[str, torch.Tensor]:
    """Values of the keys a meta-device VARGPT can state without its weights: VAR's deterministic buffers,
    the VQ-VAE's (zero) usage statistics, and the unused ``ln_q`` at LayerNorm's defaults (ones, zeros)."""
    var = model.vargpt_gen
    out = {
        "vargpt_gen.lvl_1L": var.schedule.level_ids(),
        "vargpt_gen.attn_bias_for_masking": var.schedule.block_causal_bias().contiguous(),
        "vae_local.quantize.ema_vocab_hit_SV": torch.zeros(tuple(model.vae_local.quantize.ema_vocab_hit_SV.shape)),
    }
    for i, block in enumerate(var.blocks):
        out[f"vargpt_gen.blocks.{i}.attn.zero_k_bias"] = torch.zeros(tuple(block.attn.zero_k_bias.shape))
    for name in ("image_gen_projector", "image_gen_projector_out"):
        ln = getattr(model, name).ln_q
        out[f"{name}.ln_q.weight"] = torch.ones(tuple(ln.weight.shape))
        out[f"{name}.ln_q.bias"] = torch.zeros(tuple(ln.bias.shape))
    return out


def _check_part(src: TensorSource, part: str, strict: bool) -> LoadReport:
    """Match a VAR part against a meta VAR of the size its own weights give; a VQ-VAE part is listed as is."""
    if part == "var":
        kwargs = var_kwargs_from_checkpoint(src)
        with torch.device("meta"):
            var = VAR(**kwargs)
        report = plan_load(Target.of(var), src, DEFAULT_RULES, target_label=f"VAR-d{kwargs['depth']}")
        report.raise_if_strict(strict)
        return report
    if not is_vqvae_state(src):
        raise ValueError(f"{src.label}: not a VQ-VAE state dict")
    return LoadReport(source=src.label, target="VQVAE", loaded=list(src), numel={k: src.numel(k) for k in src})
