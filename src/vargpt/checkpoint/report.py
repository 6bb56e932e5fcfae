"""What a weight load did, key by key: the :class:`LoadReport` every load returns and prints.

Categories (each key is in exactly one, counted in tensors and in parameters):

* ``loaded``: copied from the checkpoint (cast to the model's dtype when they differ);
* ``missing``: in the model, not in the checkpoint: an error when strict;
* ``unexpected``: in the checkpoint, not in the model: an error when strict;
* ``reshaped``: in both with different shapes, not loaded: an error when strict unless a rule says the model's
  own value is wanted (then the key is also listed under ``initialised``);
* ``initialised``: model keys deliberately left at the model's own values, with the reason (the stage-1 class
  embedding, generation projectors that no checkpoint has, deterministic buffers a checkpoint left out, ...);
* ``ignored``: checkpoint keys deliberately dropped, with the reason (e.g. rotary ``inv_freq`` of old saves).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

_MAX_LISTED = 25


class CheckpointMismatchError(RuntimeError):
    """A strict load found missing, unexpected or wrong-shape keys (or conflicting special tokens)."""

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        super().__init__(report.problem_summary())


@dataclass
class LoadReport:
    """Outcome of loading ``source`` into ``target`` (see the module docstring for the categories)."""

    source: str
    target: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # key -> (checkpoint shape, model shape)
    reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # key -> why the model's own value is kept
    initialised: dict[str, str] = field(default_factory=dict)
    # checkpoint key -> why it is dropped
    ignored: dict[str, str] = field(default_factory=dict)
    # key -> number of values (model shape for model keys, checkpoint shape for checkpoint-only keys)
    numel: dict[str, int] = field(default_factory=dict)
    # model keys that are buffers (counted apart from parameters)
    buffers: set[str] = field(default_factory=set)
    # (checkpoint dtype, model dtype) -> number of loaded tensors cast
    casts: Counter = field(default_factory=Counter)
    # how checkpoint key names were translated, e.g. "llava-hf (transformers >= 4.52) -> released"
    key_mapping: str | None = None
    # problems that are not about keys (e.g. the special token ids of config.json against the model's)
    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ verdict
    @property
    def ok(self) -> bool:
        """True when a strict load accepts it: nothing missing, unexpected, wrongly shaped or conflicting."""
        problem_reshaped = [k for k in self.reshaped if k not in self.initialised]
        return not (self.missing or self.unexpected or problem_reshaped or self.conflicts)

    def raise_if_strict(self, strict: bool) -> None:
        if strict and not self.ok:
            raise CheckpointMismatchError(self)

    def merge(self, other: LoadReport) -> LoadReport:
        """Fold another component's report into this one (the stage-1 init loads three sources)."""
        self.loaded += other.loaded
        self.missing += other.missing
        self.unexpected += other.unexpected
        self.reshaped.update(other.reshaped)
        self.initialised.update(other.initialised)
        self.ignored.update(other.ignored)
        self.numel.update(other.numel)
        self.buffers |= other.buffers
        self.casts.update(other.casts)
        self.conflicts += other.conflicts
        self.notes += other.notes
        if other.key_mapping:
            self.key_mapping = "; ".join(filter(None, [self.key_mapping, other.key_mapping]))
        return self

    # ------------------------------------------------------------------ counts
    def count(self, keys) -> tuple[int, int, int]:
        """(tensors, parameter values, buffer values) of ``keys``."""
        keys = list(keys)
        params = sum(self.numel.get(k, 0) for k in keys if k not in self.buffers)
        bufs = sum(self.numel.get(k, 0) for k in keys if k in self.buffers)
        return len(keys), params, bufs

    @property
    def num_loaded_params(self) -> int:
        return self.count(self.loaded)[1]

    # ------------------------------------------------------------------ text
    def problem_summary(self) -> str:
        """The strict-mode error message: every offending key, by category."""
        lines = [f"checkpoint {self.source} does not match {self.target}:"]
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): {_names(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}): {_names(self.unexpected)}")
        bad = {k: v for k, v in self.reshaped.items() if k not in self.initialised}
        if bad:
            shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in bad.items()]
            lines.append(f"  wrong shape ({len(bad)}): {_names(shapes)}")
        for c in self.conflicts:
            lines.append(f"  conflict: {c}")
        lines.append("Pass strict=False to load what matches (the report lists what was skipped).")
        return "\n".join(lines)

    def format(self) -> str:
        """The printed report: a count line per category, then the keys of every non-empty category but loaded."""
        head = f"weights: {self.source} -> {self.target}"
        if self.key_mapping:
            head += f"\n  key names: {self.key_mapping}"
        lines = [head]
        rows = [
            ("loaded", self.loaded),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("reshaped", list(self.reshaped)),
            ("initialised", list(self.initialised)),
            ("ignored", list(self.ignored)),
        ]
        for name, keys in rows:
            n, p, b = self.count(keys)
            extra = f" (+{b:,} buffer values)" if b else ""
            lines.append(f"  {name:<12}{n:>6} tensors {p:>16,} params{extra}")
        for (src, dst), n in sorted(self.casts.items(), key=str):
            lines.append(f"  cast        {n:>6} tensors {_dt(src)} -> {_dt(dst)}")
        lines += _listing("missing", self.missing)
        lines += _listing("unexpected", self.unexpected)
        lines += _listing(
            "reshaped", [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in self.reshaped.items()]
        )
        lines += _listing("initialised", _by_reason(self.initialised))
        lines += _listing("ignored", _by_reason(self.ignored))
        lines += [f"  conflict: {c}" for c in self.conflicts]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  verdict: {'OK (strict)' if self.ok else 'MISMATCH'}")
        return "\n".join(lines)

    __str__ = format


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    out = [f"  {title}:"]
    out += [f"    {it}" for it in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        out.append(f"    ... {len(items) - _MAX_LISTED} more")
    return out


def _by_reason(keyed: dict[str, str]) -> list[str]:
    """Group keys sharing a reason: ``reason: key, key, ...`` (keeps the listing short for whole sub-modules)."""
    groups: dict[str, list[str]] = {}
    for k, why in keyed.items():
        groups.setdefault(why, []).append(k)
    return [f"{why}: {_names(keys)}" if len(keys) > 1 else f"{keys[0]}: {why}" for why, keys in groups.items()]
