"""The shard sources a stream reads and their health: listing, skip counting, the bad-sample rate check.

:func:`load_sources` lists each configured source's shards from its manifest (a listed shard that is absent fails
unless ``data.allow_missing_shards``). Every DataLoader worker counts, per source, the samples it processed and
those it skipped by reason (:class:`StreamCounts`, kept by a :class:`SkipCounter`, which also logs skips at a
limited rate; an unreadable tar member or shard counts as one skipped ``read_error``), and every batch carries its
worker's counts so far (``vargpt.data.pipeline``). :func:`check_bad_rate` fails a source whose share of skipped
samples is over the threshold, naming the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vargpt.data.config import SourceConfig, resolve_path
from vargpt.data.records import CODES_MISSING, NO_IMAGE_TARGET, NOT_A_PAIR, READ_ERROR, TOO_LONG, UNEXPECTED_PAIR
from vargpt.data.shards import shard_list

log = logging.getLogger(__name__)

# The ``split`` of a stream's counts: training and evaluation streams.
TRAIN, VAL = "train", "val"

# The next step a bad-sample rate error suggests, by the reason most samples were skipped for.
_NEXT_STEP = {
    TOO_LONG: "raise data.cutoff_len",
    CODES_MISSING: "encode the source's codes (data_prep/encode_gen_codes.py) or set data.gen_codes=false",
    NOT_A_PAIR: "set data.pairs=false, or train on preference shards (data_prep/preference_to_shards.py)",
    UNEXPECTED_PAIR: "set data.pairs=true (stage=dpo_gen) for preference shards",
    NO_IMAGE_TARGET: "train on image pairs only, or set stage.preference.target=text",
}

_DEFAULT_NEXT_STEP = "check the source (data_prep/verify_shards.py lists its bad samples) and convert it again"


@dataclass
class Source:
    """A shard source as the streams use it: name, ``(path, num_samples)`` per shard, mixture weight, and the shards
    its manifest lists that are absent (left out under ``data.allow_missing_shards``)."""

    name: str
    shards: list[tuple[str, int]]
    weight: float
    missing: list[tuple[str, int]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(n for _, n in self.shards)


def _describe_missing(key: str, folder: Path, listed: list[tuple[str, int]], missing: list[tuple[str, int]]) -> str:
    """What a source's missing shards are, for an error or a warning."""
    names = ", ".join(Path(p).name for p, _ in missing[:5]) + (", ..." if len(missing) > 5 else "")
    lost, total = sum(n for _, n in missing), sum(n for _, n in listed)
    return (
        f"{key}: {len(missing)} of {len(listed)} shards listed in {folder / 'manifest.json'} are missing "
        f"({names}; {lost:,} of {total:,} samples)"
    )


def load_sources(
    sources: dict[str, SourceConfig], root: str | Path, key: str = "data.train_sources", allow_missing: bool = False
) -> list[Source]:
    """Read the manifests of configured sources (``key``: their config key, for messages); weight null ->
    num_samples; weight 0 sources are left out unread.

    A source with no sample, or whose every listed shard is absent, is an error; one with some shards absent
    is an error unless ``allow_missing`` (``data.allow_missing_shards``): then a warning names them, the source
    streams the others and its :attr:`Source.missing` lists them for the run's report.
    """
    out = []
    for name, cfg in sources.items():
        if cfg.weight is not None and cfg.weight < 0:
            raise ValueError(f"{key}.{name}.weight must be >= 0, got {cfg.weight}")
        if cfg.weight == 0:
            continue
        folder = resolve_path(cfg.path, root)
        listed = shard_list(folder)
        if not sum(n for _, n in listed):
            raise ValueError(
                f"{key}.{name}: {folder / 'manifest.json'} lists no sample: convert the source again "
                f"(data_prep/*.py), or set {key}.{name}.weight=0 to leave it out"
            )
        present = [(p, n) for p, n in listed if Path(p).is_file()]
        missing = [(p, n) for p, n in listed if not Path(p).is_file()]
        if missing:
            what = _describe_missing(f"{key}.{name}", folder, listed, missing)
            if not present:
                raise FileNotFoundError(f"{what}: restore them, or set {key}.{name}.weight=0 to leave it out")
            if not allow_missing:
                raise FileNotFoundError(
                    f"{what}: restore them (re-running the converter writes what is missing), or set "
                    "data.allow_missing_shards=true to use the shards present"
                )
            log.warning("%s: data.allow_missing_shards=true, streaming the shards present", what)
        weight = float(sum(n for _, n in present) if cfg.weight is None else cfg.weight)
        out.append(Source(name, present, weight, missing))
    return out


@dataclass
class StreamCounts:
    """Per source: the samples a stream attempted (``seen``: processed or skipped) and those it skipped, by
    reason (``skipped``). Plain dicts, so that they travel in batches and checkpoints."""

    seen: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, source: str, reason: str | None = None) -> None:
        """Count one sample of ``source``: served (``reason`` None) or skipped for ``reason``."""
        self.seen[source] = self.seen.get(source, 0) + 1
        if reason is not None:
            by_reason = self.skipped.setdefault(source, {})
            by_reason[reason] = by_reason.get(reason, 0) + 1

    def bad(self, source: str) -> int:
        """Samples of ``source`` skipped, for any reason."""
        return sum(self.skipped.get(source, {}).values())

    def __add__(self, other: StreamCounts) -> StreamCounts:
        total = StreamCounts.from_dict(self.to_dict())
        for source, n in other.seen.items():
            total.seen[source] = total.seen.get(source, 0) + n
        for source, reasons in other.skipped.items():
            mine = total.skipped.setdefault(source, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + n
        return total

    @staticmethod
    def total(parts: Iterable[StreamCounts]) -> StreamCounts:
        return sum(parts, StreamCounts())

    def to_dict(self) -> dict[str, Any]:
        return {"seen": dict(self.seen), "skipped": {s: dict(r) for s, r in self.skipped.items()}}

    @staticmethod
    def from_dict(state: dict[str, Any]) -> StreamCounts:
        skipped = {s: dict(r) for s, r in state.get("skipped", {}).items()}
        return StreamCounts(dict(state.get("seen", {})), skipped)


class BadSourceError(ValueError):
    """A source skipped more of its samples than ``data.max_bad_sample_rate`` allows."""


def check_bad_rate(counts: StreamCounts, split: str, max_rate: float, min_samples: int) -> None:
    """Raise :class:`BadSourceError` for the first source whose skipped share is over ``max_rate``.

    A source is checked only once it has ``min_samples`` samples counted (``data.bad_sample_min_samples``), so
    that 1 bad sample among the first 3 does not stop a run; from then on at every call (every batch the loop
    takes). The data module passes one rank's counts, summed over its workers, since the process started.
    """
    for source, seen in sorted(counts.seen.items()):
        bad = counts.bad(source)
        if seen < min_samples or bad <= max_rate * seen:
            continue
        reasons = counts.skipped[source]
        worst = max(reasons, key=lambda r: reasons[r])
        listed = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        raise BadSourceError(
            f"{split} source {source}: {bad} of its {seen} samples read were skipped ({bad / seen:.1%}: {listed}), "
            f"over data.max_bad_sample_rate={max_rate}: {_NEXT_STEP.get(worst, _DEFAULT_NEXT_STEP)}, or raise "
            "data.max_bad_sample_rate (1.0 never stops; the counts are still reported)"
        )


def keep_going(exc: Exception) -> bool:
    """WebDataset error handler of a reader whose errors another reader counts: continue."""
    return True


class SkipCounter:
    """Counts the samples of a stream by source, served and skipped by reason (:class:`StreamCounts`); warns on
    the first skip of each source and reason, then at most once per ``interval_s`` with the running totals (a
    bad source should not flood the log)."""

    def __init__(self, where: str, interval_s: float) -> None:
        self.where = where
        self.interval_s = interval_s
        self.counts = StreamCounts()
        self._last_warning = time.monotonic()

    def served(self, source: str) -> None:
        self.counts.add(source)

    def skip(self, source: str, reason: str, detail: str) -> None:
        self.counts.add(source, reason)
        now = time.monotonic()
        if self.counts.skipped[source][reason] == 1 or now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning(
                "%s: skipped a sample of %s: %s (%s); skipped so far %s",
                self.where,
                source,
                reason,
                detail,
                self.counts.skipped,
            )

    def handler(self, source: str) -> Callable[[Exception], bool]:
        """WebDataset error handler of ``source``'s shards: count and continue with the next member or shard."""

        def count(exc: Exception) -> bool:
            self.skip(source, READ_ERROR, repr(exc)[:200])
            return True

        return count
