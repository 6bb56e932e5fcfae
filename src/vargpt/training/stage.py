"""The one place that applies a training stage to a model: what trains, what is frozen, and in which mode.

A stage names trainable sub-modules by module-name prefix (``stage.trainable`` in ``conf/stage/*.yaml``).
A prefix matches the module or parameter of exactly that name and everything under it, never a substring:
the release freezes by substring, so its ``"image_gen_projector"`` also hits ``image_gen_projector_out`` and
``"vargpt_gen.head"`` hits ``head_nm`` (VARGPT-REFERENCE.md 5.1); prefixes make each choice explicit. When
prefixes nest, the longest one decides (``{vargpt_gen: true, vargpt_gen.class_emb: false}`` works).

``apply_stage`` sets ``requires_grad``, logs every sub-module as trainable or frozen with parameter counts,
and returns the fully frozen sub-modules, which ``set_frozen_eval`` keeps in eval mode after each
``model.train()`` so dropout and drop-path stay off inside frozen blocks (the release leaves VAR's drop-path
on in frozen blocks, reference 9.12). Frozen parameters never reach the optimizer (optim.py keeps only
``requires_grad`` ones).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger(__name__)

# The VQ-VAE is a frozen tokenizer in every VARGPT stage: no loss reaches its weights.
ALWAYS_FROZEN = ("vae_local",)


@dataclass
class StageReport:
    """What a stage did to the model: trained parameter names, per-module counts, frozen sub-modules."""

    stage: str
    trainable_names: list[str]
    # (module name, trainable params, frozen params), one row per sub-module whose parameters are uniform.
    rows: list[tuple[str, int, int]] = field(default_factory=list)
    # Largest fully frozen sub-modules (kept in eval mode).
    frozen_modules: list[str] = field(default_factory=list)

    @property
    def num_trainable(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def num_frozen(self) -> int:
        return sum(r[2] for r in self.rows)

    def table(self) -> str:
        """A human-readable table, one line per sub-module."""
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"stage {self.stage}: {self.num_trainable:,} trainable, {self.num_frozen:,} frozen parameters"]
        for name, n_train, n_frozen in self.rows:
            state = "trainable" if n_train else "frozen"
            lines.append(f"  {name:<{width}}  {state:<9}  {n_train + n_frozen:>14,}")
        return "\n".join(lines)


def _decides(name: str, prefixes: Mapping[str, bool]) -> bool:
    """Trainable flag of a parameter: the value of its longest matching prefix, frozen if none matches."""
    best = ""
    for prefix in prefixes:
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return bool(prefixes[best]) if best else False


def _check_prefixes(model: nn.Module, prefixes: Mapping[str, bool]) -> None:
    modules = {n for n, _ in model.named_modules() if n}
    params = {n for n, _ in model.named_parameters()}
    for prefix, on in prefixes.items():
        if prefix not in modules and prefix not in params:
            top = sorted(n for n, _ in model.named_children())
            raise ValueError(f"stage.trainable: {prefix!r} names no sub-module or parameter; top-level: {top}")
        if on and any(prefix == f or prefix.startswith(f + ".") or f.startswith(prefix + ".") for f in ALWAYS_FROZEN):
            raise ValueError(f"stage.trainable: {prefix!r} would train {ALWAYS_FROZEN}, which stays frozen")


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _rows(module: nn.Module, name: str) -> list[tuple[str, int, int]]:
    """One row per sub-module with uniform state, descending only where trainable and frozen mix."""
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    if n_train + n_frozen == 0:
        return []
    if n_train == 0 or n_frozen == 0:
        return [(name, n_train, n_frozen)]
    rows = []
    for pname, p in module.named_parameters(recurse=False):
        rows.append((_join(name, pname), p.numel() * p.requires_grad, p.numel() * (not p.requires_grad)))
    for cname, child in module.named_children():
        rows += _rows(child, _join(name, cname))
    return rows


def _frozen_modules(module: nn.Module, name: str) -> list[str]:
    params = list(module.parameters())
    if not params:
        return []
    if not any(p.requires_grad for p in params):
        return [name]
    out = []
    for cname, child in module.named_children():
        out += _frozen_modules(child, _join(name, cname))
    return out


def apply_stage(model: nn.Module, trainable: Mapping[str, bool], stage: str = "") -> StageReport:
    """Set ``requires_grad`` from the stage's prefixes, put frozen sub-modules in eval mode, log a table."""
    prefixes = dict(trainable)
    _check_prefixes(model, prefixes)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(_decides(name, prefixes))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"stage {stage!r} trains nothing: stage.trainable={prefixes}")
    report = StageReport(stage=stage, trainable_names=names, rows=_rows(model, ""))
    report.frozen_modules = _frozen_modules(model, "")
    set_frozen_eval(model, report.frozen_modules)
    log.info(report.table())
    return report


def set_frozen_eval(model: nn.Module, frozen_modules: list[str]) -> None:
    """Eval mode for the fully frozen sub-modules (call after every ``model.train()``)."""
    for name in frozen_modules:
        model.get_submodule(name).eval()
