"""Matching a checkpoint against a module, key by key, before anything is copied; then copying.

:func:`plan_load` compares the module's state-dict layout (works on the meta device) with a
:class:`~vargpt.checkpoint.io.TensorSource` and sorts every key into the :class:`LoadReport` categories, using
:class:`Rules` for what is accepted on purpose. :func:`apply_load` copies the ``loaded`` keys in place (or
assigns them into a meta-device module). A strict load raises before the module is touched.

Accepted everywhere (``DEFAULT_RULES``), because the official code has them or they carry no information:
the deterministic VAR buffers (``lvl_1L``, ``attn_bias_for_masking``, ``zero_k_bias``) and the VQ-VAE's
``ema_vocab_hit_SV`` may be absent (the model recomputes or keeps its own); ``ema_vocab_hit_SV`` of another
``patch_nums`` is kept as the model's (VAR's ``VQVAE.load_state_dict`` does the same); the unused ``ln_q`` of
the generation projectors may be absent; rotary ``inv_freq`` and CLIP ``position_ids`` buffers written by older
transformers are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from vargpt.checkpoint.io import TensorSource
from vargpt.checkpoint.report import LoadReport

# Buffers whose value follows from the config alone; when a checkpoint holds them they must agree.
DETERMINISTIC_BUFFERS = re.compile(r"(.*\.)?(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)")


@dataclass(frozen=True)
class Rule:
    """Keys (regular expression, full match) accepted on purpose, and why."""

    pattern: str
    reason: str

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None


@dataclass(frozen=True)
class Rules:
    """What a load accepts without calling it a mismatch."""

    # model keys the checkpoint may lack (-> initialised)
    allow_missing: tuple[Rule, ...] = ()
    # model keys whose checkpoint shape may differ; the model's value is kept (-> reshaped + initialised)
    allow_reshape: tuple[Rule, ...] = ()
    # checkpoint keys dropped (-> ignored)
    allow_unexpected: tuple[Rule, ...] = ()

    def __add__(self, other: Rules) -> Rules:
        return Rules(
            self.allow_missing + other.allow_missing,
            self.allow_reshape + other.allow_reshape,
            self.allow_unexpected + other.allow_unexpected,
        )


def _why(rules: Iterable[Rule], key: str) -> str | None:
    return next((r.reason for r in rules if r.matches(key)), None)


DEFAULT_RULES = Rules(
    allow_missing=(
        Rule(r"(.*\.)?lvl_1L", "deterministic buffer (scale of each token), recomputed from patch_nums"),
        Rule(r"(.*\.)?attn_bias_for_masking", "deterministic buffer (block-causal mask), recomputed from patch_nums"),
        Rule(r"(.*\.)?blocks\.\d+\.attn\.zero_k_bias", "deterministic buffer (the zero k bias)"),
        Rule(r"(.*\.)?quantize\.ema_vocab_hit_SV", "code-usage statistics, unused by the forward"),
        Rule(
            r"(.*\.)?image_gen_projector(_out)?\.ln_q\.(weight|bias)",
            "ln_q is never used in forward (released, unused)",
        ),
    ),
    allow_reshape=(
        Rule(
            r"(.*\.)?quantize\.ema_vocab_hit_SV",
            "code-usage statistics of another patch_nums; the model's are kept (as VAR's VQVAE.load_state_dict)",
        ),
    ),
    allow_unexpected=(
        Rule(r".*\.rotary_emb\.inv_freq", "rotary frequencies written by older transformers; recomputed"),
        Rule(r".*\.embeddings\.position_ids", "CLIP position ids written by older transformers; recomputed"),
    ),
)


@dataclass
class Target:
    """The layout a load fills: ``{key: (shape, dtype)}`` and which keys are buffers."""

    layout: dict[str, tuple[tuple[int, ...], torch.dtype]]
    buffers: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, module: nn.Module, prefix: str = "") -> Target:
        sd = module.state_dict()
        buffer_names = {n for n, _ in module.named_buffers()}
        layout = {prefix + k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        return cls(layout, {prefix + k for k in sd if k in buffer_names})

    def restrict(self, prefixes: Iterable[str]) -> Target:
        prefixes = tuple(prefixes)
        return Target(
            {k: v for k, v in self.layout.items() if k.startswith(prefixes)},
            {k for k in self.buffers if k.startswith(prefixes)},
        )


def plan_load(
    target: Target,
    source: TensorSource,
    rules: Rules = DEFAULT_RULES,
    *,
    source_label: str | None = None,
    target_label: str = "model",
) -> LoadReport:
    """Sort every key of ``target`` and ``source`` into the report's categories (nothing is read or copied)."""
    report = LoadReport(source=source_label or source.label, target=target_label)
    report.buffers = set(target.buffers)
    src_keys = set(source)
    for key, (shape, dtype) in target.layout.items():
        report.numel[key] = _prod(shape)
        if key not in src_keys:
            why = _why(rules.allow_missing, key)
            if why is None:
                report.missing.append(key)
            else:
                report.initialised[key] = why
            continue
        src_shape = source.shape(key)
        if src_shape != shape:
            report.reshaped[key] = (src_shape, shape)
            why = _why(rules.allow_reshape, key)
            if why is not None:
                report.initialised[key] = why
            continue
        report.loaded.append(key)
        src_dtype = source.dtype(key)
        if src_dtype != dtype:
            report.casts[(src_dtype, dtype)] += 1
    for key in source:
        if key in target.layout:
            continue
        report.numel[key] = source.numel(key)
        why = _why(rules.allow_unexpected, key)
        if why is None:
            report.unexpected.append(key)
        else:
            report.ignored[key] = why
    return report


@torch.no_grad()
def apply_load(
    module: nn.Module, source: TensorSource, report: LoadReport, prefix: str = "", chunk: int = 64
) -> LoadReport:
    """Copy ``report.loaded`` (keys carrying ``prefix``) from ``source`` into ``module``.

    In place (``copy_``, which casts dtype and device) for materialised modules; for a module on the meta device
    the tensors are assigned (cast to the module's dtype), ``chunk`` keys at a time. A deterministic buffer whose
    checkpoint value disagrees with the model's is not copied; the report notes it. Call before wrapping the
    module with FSDP/DDP.
    """
    refs = module.state_dict(keep_vars=True)
    keys = [k for k in report.loaded if k.startswith(prefix)]
    local = {k: k[len(prefix) :] for k in keys}
    meta = [k for k in keys if refs[local[k]].is_meta]
    for k in keys:
        if k in meta:
            continue
        dst, src = refs[local[k]], source[k]
        if DETERMINISTIC_BUFFERS.fullmatch(local[k]) and not torch.equal(src.to(dst.dtype), dst.cpu().to(dst.dtype)):
            report.notes.append(
                f"{k}: the checkpoint's value differs from the one computed from the config; kept the model's"
            )
            continue
        dst.copy_(src)
    for i in range(0, len(meta), chunk):
        part = {local[k]: source[k].to(refs[local[k]].dtype) for k in meta[i : i + chunk]}
        module.load_state_dict(part, strict=False, assign=True)
    if meta:
        left = [k for k, v in module.state_dict(keep_vars=True).items() if v.is_meta]
        if left:
            report.notes.append(f"{len(left)} tensors of the meta-device model hold no data yet, e.g. {left[:3]}")
    return report


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def strip_common_head(keys: Iterable[str], known_heads: Iterable[str]) -> str:
    """The wrapper prefix (``module.``, ``_orig_mod.``, a Lightning attribute ...) shared by every key, when the
    first name is not one of the model's own top-level names; ``""`` when there is none."""
    keys, known = list(keys), set(known_heads)
    prefix = ""
    for _ in range(4):
        heads = {k[len(prefix) :].split(".", 1)[0] for k in keys}
        if len(heads) != 1:
            break
        head = heads.pop()
        if head in known or not all("." in k[len(prefix) :] for k in keys):
            break
        prefix += head + "."
    return prefix


def heads_of(layout: Mapping[str, object]) -> set[str]:
    return {k.split(".", 1)[0] for k in layout}
