"""VAR-only and VQ-VAE-only checkpoints (``var_d16.pth`` .. ``var_d30.pth``, ``vae_ch160v4096z32.pth``).

Both are plain ``torch.save(state_dict)`` files of FoundationVision/VAR's modules, whose names our
:class:`~vargpt.model.var.VAR` and :class:`~vargpt.model.vqvae.VQVAE` share key for key (VARGPT-REFERENCE.md
7.2, 7.3). Loading is strict by default; exporting writes the same kind of file (``.pth``, or ``.safetensors``
when the path says so), so the official VAR code loads what we train, and :func:`var_kwargs_from_checkpoint`
rebuilds a VAR of the right size from the weights alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vargpt.checkpoint.io import (
    MemorySource,
    TensorSource,
    open_checkpoint,
    save_torch_state_dict,
    subset,
    write_safetensors,
)
from vargpt.checkpoint.match import DEFAULT_RULES, Rules, Target, apply_load, plan_load, strip_common_head
from vargpt.checkpoint.released_config import parse_dtype
from vargpt.checkpoint.report import LoadReport
from vargpt.model.scales import VAR_PATCH_NUMS
from vargpt.model.var import VAR
from vargpt.model.vqvae import VQVAE

# Top-level names of the two state dicts (the first name of every key).
VAR_HEADS = frozenset(
    {
        "pos_start",
        "pos_1LC",
        "lvl_1L",
        "attn_bias_for_masking",
        "word_embed",
        "class_emb",
        "lvl_embed",
        "blocks",
        "head_nm",
        "head",
    }
)
VQVAE_HEADS = frozenset({"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"})


def is_var_state(keys) -> bool:
    keys = set(keys)
    return "class_emb.weight" in keys and "word_embed.weight" in keys and "head.weight" in keys


def is_vqvae_state(keys) -> bool:
    keys = set(keys)
    return "quantize.embedding.weight" in keys and "encoder.conv_in.weight" in keys


def unwrapped(source: TensorSource, heads: frozenset[str]) -> TensorSource:
    """``source`` without a wrapper prefix shared by all keys (``module.``, a Lightning attribute ...)."""
    prefix = strip_common_head(source, heads)
    return subset(source, prefix, label=source.label) if prefix else source


def _as_source(source: Any) -> TensorSource:
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, dict):
        return MemorySource(source)
    return open_checkpoint(source)


def load_var(var: nn.Module, source: Any, strict: bool = True, rules: Rules = DEFAULT_RULES) -> LoadReport:
    """Load a VAR checkpoint (path, state dict or TensorSource) into a :class:`VAR`; strict by default."""
    src = unwrapped(_as_source(source), VAR_HEADS)
    report = plan_load(Target.of(var), src, rules, target_label=f"VAR-d{getattr(var, 'depth', '?')}")
    report.raise_if_strict(strict)
    return apply_load(var, src, report)


def load_vqvae(vqvae: nn.Module, source: Any, strict: bool = True, rules: Rules = DEFAULT_RULES) -> LoadReport:
    """Load a VQ-VAE checkpoint into a :class:`VQVAE`; strict by default (``ema_vocab_hit_SV`` of another
    ``patch_nums`` is kept as the model's, as VAR's own loader does)."""
    src = unwrapped(_as_source(source), VQVAE_HEADS)
    report = plan_load(Target.of(vqvae), src, rules, target_label="VQVAE")
    report.raise_if_strict(strict)
    return apply_load(vqvae, src, report)


def var_kwargs_from_checkpoint(source: Any) -> dict[str, Any]:
    """``VAR(**kwargs)`` arguments that fit a VAR checkpoint: depth, width, heads, classes, codebook, patch_nums.

    ``patch_nums`` comes from the ``lvl_1L`` buffer (how many tokens each scale has); without it, VAR's 256-px
    schedule is assumed if the token count is 680.
    """
    src = unwrapped(_as_source(source), VAR_HEADS)
    if not is_var_state(src):
        raise ValueError(f"{src.label}: not a VAR checkpoint (no class_emb/word_embed/head weights)")
    depth = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    C = src.shape("pos_start")[-1]
    heads = src.shape("blocks.0.attn.scale_mul_1H11")[1] if "blocks.0.attn.scale_mul_1H11" in src else depth
    if "lvl_1L" in src:
        counts = torch.bincount(src["lvl_1L"].flatten()).tolist()
        patch_nums = tuple(math.isqrt(n) for n in counts)
        if any(p * p != n for p, n in zip(patch_nums, counts, strict=True)):
            raise ValueError(f"{src.label}: lvl_1L token counts {counts} are not squares")
    else:
        L = src.shape("pos_1LC")[1]
        if sum(p * p for p in VAR_PATCH_NUMS) != L:
            raise ValueError(f"{src.label}: {L} tokens and no lvl_1L buffer: pass patch_nums yourself")
        patch_nums = VAR_PATCH_NUMS
    return {
        "depth": depth,
        "embed_dim": C,
        "num_heads": heads,
        "num_classes": src.shape("class_emb.weight")[0] - 1,
        "vocab_size": src.shape("head.weight")[0],
        "z_channels": src.shape("word_embed.weight")[1],
        "patch_nums": patch_nums,
        "attn_l2_norm": "blocks.0.attn.scale_mul_1H11" in src,
    }


def _state_of(model_or_part: nn.Module, attr: str, part_cls: type) -> dict[str, torch.Tensor]:
    part = getattr(model_or_part, attr, model_or_part)
    if not isinstance(part, part_cls):
        raise TypeError(f"expected a VARGPT or a {part_cls.__name__}, got {type(model_or_part).__name__}")
    return {k: v.detach() for k, v in part.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None) -> Path:
    path = Path(path)
    if path.name.endswith(".safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / (path.name + ".tmpdir")
        written = write_safetensors(MemorySource(state), tmp, dtype=dtype, max_shard_size=1 << 62)
        written[0].replace(path)
        tmp.rmdir()
        return path
    return save_torch_state_dict(state, path, dtype=dtype)


def export_var(model_or_var: nn.Module, path: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write the VAR decoder (a VARGPT's ``vargpt_gen``, or a VAR) as a VAR state dict (``.pth`` as VAR's
    releases, or ``.safetensors``). A VARGPT's class embedding keeps its ``gen_start_id + 2`` rows: build the
    official VAR with ``num_classes = gen_start_id + 1`` to load it strictly."""
    return _save(_state_of(model_or_var, "vargpt_gen", VAR), path, parse_dtype(dtype))


def export_vqvae(model_or_vqvae: nn.Module, path: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write the VQ-VAE (a VARGPT's ``vae_local``, or a VQVAE) as a VAR-style VQ-VAE state dict."""
    return _save(_state_of(model_or_vqvae, "vae_local", VQVAE), path, parse_dtype(dtype))
