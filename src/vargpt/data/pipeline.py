"""Streams of batches from shard sources: the seeded training mixture and the exact evaluation split.

Training (:class:`TrainStream`), in every DataLoader worker: each source draws shards with replacement
(weighted by their sample counts, so every sample is equally likely) and reads them with a counting, rate-
limited error handler; a seeded draw per sample mixes the sources by weight; one shuffle buffer holds raw
bytes; samples are decoded, tokenised and transformed only after shuffling; batches are collated in the
worker; each worker stops after a fixed number of batches (WebDataset's ``with_epoch`` after ``batched``), so
every rank runs the same number of steps per "epoch". Every random choice is seeded by (seed, epoch, rank,
worker), so a stream is a pure function of them: each batch carries its worker's position (raw samples read,
batches made) and resuming from a saved position skips that many raw samples, unopened, to continue exactly.

Evaluation (:class:`EvalStream`): every shard once, in manifest order, split across ranks then workers as
WebDataset's ``split_by_node`` / ``split_by_worker`` do; with fewer shards than ranks x workers, samples are
split round-robin instead. Either way no sample is seen twice and none is dropped.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vargpt.data.chat import tokenize_conversation
from vargpt.data.collate import Collator, Example
from vargpt.data.config import SourceConfig, resolve_path
from vargpt.data.records import IMAGE, IMAGE_UNREADABLE, READ_ERROR, InvalidSampleError
from vargpt.data.shards import iter_raw_samples, parse_record, shard_list
from vargpt.data.transforms import decode_image
from vargpt.model.tokens import SpecialTokenIds

log = logging.getLogger(__name__)

# A source whose shards give no sample this many times in a row is broken, not unlucky.
_MAX_EMPTY_SHARDS = 100


@dataclass
class Source:
    """A shard source as the streams use it: name, ``(path, num_samples)`` per shard, mixture weight."""

    name: str
    shards: list[tuple[str, int]]
    weight: float

    @property
    def num_samples(self) -> int:
        return sum(n for _, n in self.shards)


def load_sources(sources: dict[str, SourceConfig], root: str | Path) -> list[Source]:
    """Read the manifests of configured sources; weight null -> num_samples; weight 0 sources are left out."""
    out = []
    for name, cfg in sources.items():
        shards = shard_list(resolve_path(cfg.path, root))
        weight = float(sum(n for _, n in shards) if cfg.weight is None else cfg.weight)
        if weight < 0:
            raise ValueError(f"source {name}: weight must be >= 0, got {weight}")
        if weight > 0 and shards:
            out.append(Source(name, shards, weight))
    return out


class SkipCounter:
    """Counts skipped samples and unreadable shards by reason; warns on the first of each reason, then at most
    once per ``interval_s`` with the running totals (a bad source should not flood the log)."""

    def __init__(self, where: str, interval_s: float) -> None:
        self.where = where
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self._last_warning = time.monotonic()

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if self.counts[reason] == 1 or now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning("%s: skipped %s (%s); totals so far %s", self.where, reason, detail, dict(self.counts))

    def handler(self, exc: Exception) -> bool:
        """WebDataset error handler: count and continue with the next member or shard."""
        self.add(READ_ERROR, repr(exc)[:200])
        return True


@dataclass
class SampleProcessor:
    """Raw shard sample -> :class:`Example`: check, tokenise with the chat template, decode and transform."""

    tokenizer: Any
    ids: SpecialTokenIds
    num_image_tokens: int
    num_gen_tokens: int
    cutoff_len: int | None
    und_transform: Any
    gen_transform: Any

    def __call__(self, raw: dict[str, Any], source: str) -> Example:
        record, images = parse_record(raw)
        tok = tokenize_conversation(
            record["messages"],
            self.tokenizer,
            self.ids,
            self.num_image_tokens,
            self.num_gen_tokens,
            cutoff_len=self.cutoff_len,
        )
        example = Example(torch.tensor(tok.input_ids), torch.tensor(tok.labels))
        # Truncation keeps a prefix of the placeholders, so the first len(image_kinds) images are the kept ones.
        for kind, data in zip(tok.image_kinds, images, strict=False):
            try:
                img = decode_image(data)
            except Exception as exc:  # PIL raises many types for corrupt data; all mean "skip this sample"
                raise InvalidSampleError(IMAGE_UNREADABLE, f"{raw['__key__']}: {exc}") from None
            if kind == IMAGE:
                example.pixel_values.append(self.und_transform(img))
            else:
                example.pixel_gen_values.append(self.gen_transform(img))
        example.meta = {
            **record.get("meta", {}),
            "source": source,
            "dataset": record.get("source"),
            "id": record.get("id", raw["__key__"]),
            "truncated": tok.truncated,
        }
        return example


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _process(
    samples: Iterator[tuple[str, dict[str, Any]]], processor: SampleProcessor, skips: SkipCounter
) -> Iterator[Example]:
    for source, raw in samples:
        try:
            yield processor(raw, source)
        except InvalidSampleError as exc:
            skips.add(exc.reason, exc.detail)


class TrainStream(IterableDataset):
    """The training stream of one rank: endless seeded mixture, fixed batches per epoch, resumable position.

    ``set_epoch(epoch, positions)`` before iterating picks the epoch's streams and, to resume, each worker's
    position ``{"cursor": raw samples read, "batches": batches made}`` (what every batch reports in its
    ``_stream`` entry).
    """

    def __init__(
        self,
        sources: list[Source],
        processor: SampleProcessor,
        collator: Collator,
        micro_batch_size: int,
        samples_per_epoch: int,
        num_workers: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        warn_interval_s: float = 60.0,
    ) -> None:
        if not sources:
            raise ValueError("the training stream has no source with a positive weight")
        self.sources = sources
        self.processor = processor
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = max(num_workers, 1)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = shuffle_initial
        self.warn_interval_s = warn_interval_s
        self.epoch = 0
        self.positions: dict[int, dict[str, int]] = {}

    def set_epoch(self, epoch: int, positions: dict[int, dict[str, int]] | None = None) -> None:
        self.epoch = epoch
        self.positions = dict(positions or {})

    def batches_per_worker(self) -> int:
        """Batches each worker makes per epoch: the epoch's samples over ranks, batches and workers, rounded up."""
        per_rank = math.ceil(self.samples_per_epoch / (self.world_size * self.micro_batch_size))
        return math.ceil(per_rank / self.num_workers)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_worker() * self.num_workers

    def _seed(self, worker: int, role: str) -> str:
        return f"{self.seed}:{self.epoch}:{self.rank}/{self.world_size}:{worker}/{self.num_workers}:{role}"

    def _source_samples(self, source: Source, rng: random.Random, skips: SkipCounter) -> Iterator[dict[str, Any]]:
        """Endless raw samples of one source, shards drawn with replacement in proportion to their size."""
        paths, counts = [p for p, _ in source.shards], [n for _, n in source.shards]
        empty = 0
        while True:
            path = rng.choices(paths, weights=counts)[0]
            got = 0
            for raw in iter_raw_samples([path], handler=skips.handler):
                got += 1
                yield raw
            empty = 0 if got else empty + 1
            if empty >= _MAX_EMPTY_SHARDS:
                raise RuntimeError(
                    f"source {source.name}: {empty} shards in a row gave no sample ({dict(skips.counts)})"
                )

    def _raw_stream(self, worker: int, skips: SkipCounter) -> Iterator[tuple[str, dict[str, Any]]]:
        """The worker's shuffled mixture of raw samples, ``(source name, raw sample)``."""
        import webdataset as wds

        streams = [self._source_samples(s, random.Random(self._seed(worker, s.name)), skips) for s in self.sources]
        pick = random.Random(self._seed(worker, "mix"))
        weights = [s.weight for s in self.sources]
        names = [s.name for s in self.sources]

        def mixed() -> Iterator[tuple[str, dict[str, Any]]]:
            while True:
                i = pick.choices(range(len(streams)), weights=weights)[0]
                yield names[i], next(streams[i])

        rng = random.Random(self._seed(worker, "shuffle"))
        return wds.filters._shuffle(mixed(), self.shuffle_buffer, self.shuffle_initial, rng=rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        if num_workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers runs in a DataLoader with {num_workers}")
        position = dict(self.positions.get(worker, {"cursor": 0, "batches": 0}))
        if position["batches"] >= self.batches_per_worker():
            return
        skips = SkipCounter(f"train rank {self.rank} worker {worker}", self.warn_interval_s)
        # Resume: the stream is a pure function of its seeds, so skipping the raw samples already read (without
        # decoding them) continues exactly where the saved position was.
        raw = itertools.islice(self._raw_stream(worker, skips), position["cursor"], None)

        def counted() -> Iterator[tuple[str, dict[str, Any]]]:
            for item in raw:
                position["cursor"] += 1
                yield item

        batch: list[Example] = []
        for example in _process(counted(), self.processor, skips):
            batch.append(example)
            if len(batch) < self.micro_batch_size:
                continue
            position["batches"] += 1
            out = self.collator(batch)
            out["_stream"] = {"epoch": self.epoch, "worker": worker, **position, "skipped": dict(skips.counts)}
            yield out
            batch = []
            if position["batches"] >= self.batches_per_worker():
                return


class EvalStream(IterableDataset):
    """One pass over evaluation sources, split across ranks and workers without overlap or loss.

    Ranks may get a different number of batches (shards differ in size): evaluation code must not run a
    collective per batch (e.g. ``log(..., sync_dist=True)`` in a step); aggregate at the end of the epoch.
    """

    def __init__(
        self,
        sources: list[Source],
        processor: SampleProcessor,
        collator: Collator,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        warn_interval_s: float = 60.0,
    ) -> None:
        self.sources = sources
        self.processor = processor
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.warn_interval_s = warn_interval_s

    def _samples(self, worker: int, num_workers: int, skips: SkipCounter) -> Iterator[tuple[str, dict[str, Any]]]:
        shards = [(s.name, path) for s in self.sources for path, _ in s.shards]
        slots = self.world_size * num_workers
        if len(shards) >= slots:
            # split_by_node, then split_by_worker
            mine = shards[self.rank :: self.world_size][worker::num_workers]
            for name, path in mine:
                yield from ((name, raw) for raw in iter_raw_samples([path], handler=skips.handler))
            return
        every = ((name, raw) for name, path in shards for raw in iter_raw_samples([path], handler=skips.handler))
        yield from itertools.islice(every, self.rank * num_workers + worker, None, slots)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        skips = SkipCounter(f"eval rank {self.rank} worker {worker}", self.warn_interval_s)
        examples = _process(self._samples(worker, num_workers, skips), self.processor, skips)
        while batch := list(itertools.islice(examples, self.micro_batch_size)):
            yield self.collator(batch)
