"""Streams of batches from shard sources: the seeded training mixture and the exact evaluation split.

Training (:class:`TrainStream`), in every DataLoader worker: each source draws shards with replacement
(weighted by their sample counts, so every sample is equally likely) and reads them with a counting, rate-
limited error handler; a seeded draw per sample mixes the sources by weight; one shuffle buffer holds raw
bytes; samples are decoded, tokenised and transformed only after shuffling; batches are collated in the
worker; each worker stops after a fixed number of batches (WebDataset's ``with_epoch`` after ``batched``), so
every rank runs the same number of steps per "epoch". Every random choice is seeded by (seed, epoch, rank,
worker), so a stream is a pure function of them: each batch carries its worker's position (raw samples read,
batches made) and resuming from a saved position skips that many raw samples, unopened, to continue exactly.

Length grouping (``group_by``, LLaVA's ``group_by_length`` / ``group_by_modality_length``): instead of batching
in stream order, each worker fills a pool of ``micro_batch_size x group_batches`` processed samples, sorts it by
token count (per modality: understanding-only vs generation), cuts it into micro batches and serves them in a
seeded random order (:func:`group_by_length`), reading the next pool's samples as it serves them. The position
then also names what rebuilds the pools (where their samples start and end, the raw indices of the leftover a
pool took over, how many of its batches were served), so a resume re-processes those samples only and continues
exactly.

Preference pairs (``data.pairs``): the processor is :class:`vargpt.data.pairs.PairProcessor` and the collator
:class:`vargpt.data.collate.PairCollator`; a pair is one sample for positions, counts and micro batches (length
grouping sorts pairs by their longer row).

Evaluation (:class:`EvalStream`): every shard once, in manifest order, split across ranks then workers as
WebDataset's ``split_by_node`` / ``split_by_worker`` do; with fewer shards than ranks x workers, samples are
split round-robin instead. Either way no sample is seen twice and none is dropped.

Data health: every worker counts, per source, the samples it processed and those it skipped by reason
(``StreamCounts``; an unreadable tar member or shard counts as one skipped ``read_error``), and every batch
carries its worker's counts so far in its ``_stream`` entry (the data module sums them over workers and ranks).
The sources, their counts and the bad-rate check are :mod:`vargpt.data.stream_sources`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from vargpt.data.chat import tokenize_conversation
from vargpt.data.collate import Example, PairExample
from vargpt.data.config import GroupBy
from vargpt.data.records import (
    CODES_MISSING,
    IMAGE,
    IMAGE_GEN,
    IMAGE_UNREADABLE,
    InvalidSampleError,
)
from vargpt.data.shards import GEN_CODES, decode_codes, iter_raw_samples, parse_record
from vargpt.data.stream_sources import TRAIN, VAL, SkipCounter, Source, keep_going
from vargpt.data.transforms import decode_image
from vargpt.tokens import SpecialTokenIds

log = logging.getLogger(__name__)

# What a stream batches: a conversation's example, or a preference pair's (data.pairs, vargpt.data.pairs).
Item = Example | PairExample
# Raw sample and source name -> item (SampleProcessor, pairs.PairProcessor); items -> batch (collate.Collator,
# collate.PairCollator).
Processor = Callable[[dict[str, Any], str], Item]
BatchCollator = Callable[[list[Item]], dict[str, Any]]

# A source whose shards give no sample this many times in a row is broken, not unlucky.
_MAX_EMPTY_SHARDS = 100


@dataclass
class SampleProcessor:
    """Raw shard sample -> :class:`Example`: check, tokenise with the chat template, decode and transform.

    ``gen_codes``: generation targets come from their precomputed codes (``data.gen_codes``), not their pixels.
    """

    tokenizer: Any
    ids: SpecialTokenIds
    num_image_tokens: int
    num_gen_tokens: int
    cutoff_len: int | None
    und_transform: Any
    gen_transform: Any
    gen_codes: bool = False

    def __call__(self, raw: dict[str, Any], source: str) -> Example:
        record, images = parse_record(raw, codes_ok=self.gen_codes)
        return self.build(raw, record, record["messages"], list(zip(record["images"], images, strict=True)), source)

    def build(
        self,
        raw: dict[str, Any],
        record: dict[str, Any],
        messages: list[dict[str, str]],
        images: list[tuple[str, Any]],
        source: str,
    ) -> Example:
        """The :class:`Example` of ``messages`` (checked turns) whose placeholders refer to ``images``
        (``(name, bytes or None)`` in placeholder order); ``record`` gives the codes members and the meta."""
        tok = tokenize_conversation(
            messages,
            self.tokenizer,
            self.ids,
            self.num_image_tokens,
            self.num_gen_tokens,
            cutoff_len=self.cutoff_len,
        )
        example = Example(torch.tensor(tok.input_ids), torch.tensor(tok.labels))
        # Truncation keeps a prefix of the placeholders, so the first len(image_kinds) images are the kept ones.
        for kind, (name, data) in zip(tok.image_kinds, images, strict=False):
            if kind == IMAGE_GEN and self.gen_codes:
                example.gen_codes.append(self._codes(raw, record.get(GEN_CODES, {}).get(name)))
                continue
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

    def _codes(self, raw: dict[str, Any], member: str | None) -> torch.Tensor:
        """A generation target's precomputed codes (L,) long."""
        if member is None or member not in raw:
            raise InvalidSampleError(CODES_MISSING, f"{raw['__key__']}: no precomputed codes (encode_gen_codes.py)")
        codes_L = torch.from_numpy(decode_codes(raw[member]).astype("int64"))
        if len(codes_L) != self.num_gen_tokens:
            # Codes of another VQ-VAE schedule: every sample of the source is wrong, so stop rather than skip.
            raise ValueError(f"{raw['__key__']}: {len(codes_L)} codes, the model's schedule has {self.num_gen_tokens}")
        return codes_L


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _example(item: tuple[str, dict[str, Any]], processor: Processor, skips: SkipCounter) -> Item | None:
    """A ``(source, raw)`` sample processed, or None when it is invalid; counted either way."""
    source, raw = item
    try:
        example = processor(raw, source)
    except InvalidSampleError as exc:
        skips.skip(source, exc.reason, exc.detail)
        return None
    skips.served(source)
    return example


def _process(samples: Iterator[tuple[str, dict[str, Any]]], processor: Processor, skips: SkipCounter) -> Iterator[Item]:
    for item in samples:
        if (example := _example(item, processor, skips)) is not None:
            yield example


# A pooled sample: (its index in the worker's raw stream, the sample).
Indexed = tuple[int, Item]


def group_by_length(
    pool: list[Indexed], batch_size: int, by_modality: bool, rng: random.Random
) -> tuple[list[list[Indexed]], list[Indexed]]:
    """Cut a pool (in read order) into micro batches of similar length: ``(batches in random order, leftover)``.

    Per group (one, or understanding-only and generation samples apart when ``by_modality``), the samples are sorted
    by token count, longest first, and cut into ``batch_size`` runs. When a group's size is not a multiple of the
    batch, its last-read samples are the leftover (in read order), for the next pool: chosen by arrival, not by
    length, so that no length waits longer than another (LLaVA instead mixes the leftovers in one batch).
    """
    groups: dict[bool, list[Indexed]] = {}
    for item in pool:
        groups.setdefault(by_modality and item[1].is_generation, []).append(item)
    batches: list[list[Indexed]] = []
    leftover: list[Indexed] = []
    for _, members in sorted(groups.items()):
        cut = len(members) - len(members) % batch_size
        leftover += members[cut:]
        ordered = sorted(members[:cut], key=lambda item: -item[1].num_tokens)  # stable: ties in read order
        batches += [ordered[i : i + batch_size] for i in range(0, cut, batch_size)]
    rng.shuffle(batches)
    return batches, sorted(leftover, key=lambda item: item[0])


class TrainStream(IterableDataset):
    """The training stream of one rank: endless seeded mixture, fixed batches per epoch, resumable position.

    ``set_epoch(epoch, positions)`` before iterating picks the epoch's streams and, to resume, each worker's
    position ``{"cursor": raw samples read, "batches": batches made}`` (what every batch reports in its
    ``_stream`` entry; with length grouping also ``start``, ``carry``, ``end`` and ``emitted``: see
    :meth:`_grouped`).
    """

    def __init__(
        self,
        sources: list[Source],
        processor: Processor,
        collator: BatchCollator,
        micro_batch_size: int,
        samples_per_epoch: int,
        num_workers: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        warn_interval_s: float = 60.0,
        group_by: GroupBy | str = GroupBy.none,
        group_batches: int = 16,
    ) -> None:
        if not sources:
            raise ValueError("the training stream has no source with a positive weight")
        self.group_by = GroupBy(group_by)
        if self.group_by is not GroupBy.none and group_batches < 2:
            # Two modalities may each leave up to micro_batch_size - 1 samples: a pool of 2 batches always cuts one.
            raise ValueError(f"group_batches must be >= 2 with group_by={self.group_by.value}, got {group_batches}")
        self.group_batches = group_batches
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
        self.positions: dict[int, dict[str, Any]] = {}

    def set_epoch(self, epoch: int, positions: dict[int, dict[str, Any]] | None = None) -> None:
        self.epoch = epoch
        self.positions = dict(positions or {})

    def batches_per_worker(self) -> int:
        """Batches each worker makes per epoch: the epoch's samples over ranks, batches and workers, rounded up."""
        per_rank = math.ceil(self.samples_per_epoch / (self.world_size * self.micro_batch_size))
        return math.ceil(per_rank / self.num_workers)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_worker() * self.num_workers

    @property
    def grouping(self) -> str:
        """What a saved position depends on besides seed, ranks and workers: ``none`` or ``<group_by>:<batches>``."""
        return "none" if self.group_by is GroupBy.none else f"{self.group_by.value}:{self.group_batches}"

    def _seed(self, worker: int, role: str) -> str:
        return f"{self.seed}:{self.epoch}:{self.rank}/{self.world_size}:{worker}/{self.num_workers}:{role}"

    def _source_samples(self, source: Source, rng: random.Random, skips: SkipCounter) -> Iterator[dict[str, Any]]:
        """Endless raw samples of one source, shards drawn with replacement in proportion to their size."""
        paths, counts = [p for p, _ in source.shards], [n for _, n in source.shards]
        empty = 0
        while True:
            path = rng.choices(paths, weights=counts)[0]
            got = 0
            for raw in iter_raw_samples([path], handler=skips.handler(source.name)):
                got += 1
                yield raw
            empty = 0 if got else empty + 1
            if empty >= _MAX_EMPTY_SHARDS:
                raise RuntimeError(
                    f"source {source.name}: {empty} shards in a row gave no sample "
                    f"({skips.counts.skipped.get(source.name, {})}): check it with data_prep/verify_shards.py"
                )

    def _raw_stream(self, worker: int, skips: SkipCounter) -> Iterator[tuple[str, dict[str, Any]]]:
        """The worker's shuffled mixture of raw samples, ``(source name, raw sample)``."""
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
        position = {"cursor": 0, "batches": 0, **copy.deepcopy(self.positions.get(worker, {}))}
        if position["batches"] >= self.batches_per_worker():
            return
        skips = SkipCounter(f"train rank {self.rank} worker {worker}", self.warn_interval_s)
        raw = self._raw_stream(worker, skips)
        make = self._in_order if self.group_by is GroupBy.none else self._grouped
        for examples in make(raw, position, worker, skips):
            out = self.collator(examples)
            out["_stream"] = {"split": TRAIN, "epoch": self.epoch, "worker": worker, **copy.deepcopy(position)}
            out["_stream"]["counts"] = skips.counts.to_dict()
            yield out
            if position["batches"] >= self.batches_per_worker():
                return

    def _in_order(
        self, raw: Iterator[tuple[str, dict[str, Any]]], position: dict[str, Any], worker: int, skips: SkipCounter
    ) -> Iterator[list[Item]]:
        """Micro batches in stream order; updates ``position`` before each."""
        # Resume: the stream is a pure function of its seeds, so skipping the raw samples already read (without
        # decoding them) continues exactly where the saved position was.
        batch: list[Item] = []
        for index, item in itertools.islice(enumerate(raw), position["cursor"], None):
            position["cursor"] = index + 1
            if (example := _example(item, self.processor, skips)) is None:
                continue
            batch.append(example)
            if len(batch) == self.micro_batch_size:
                position["batches"] += 1
                yield batch
                batch = []

    def _grouped(
        self, raw: Iterator[tuple[str, dict[str, Any]]], position: dict[str, Any], worker: int, skips: SkipCounter
    ) -> Iterator[list[Item]]:
        """Length-grouped micro batches (:func:`group_by_length`); updates ``position`` before each.

        The first pool is filled before the first batch; then, before serving each batch of a pool, ``B`` fresh
        samples go into the next one, so reading keeps pace with the steps instead of stalling one step per pool.
        Besides ``cursor`` and ``batches``, the position names the pools: the one being served holds the samples
        of ``carry`` (raw indices of the leftover it took over) and those read from ``start`` to ``end``; it has
        served ``emitted`` batches; the samples read from ``end`` on wait for the next pool. ``end`` None: the pool
        is still being filled (its last batch already names the next pool so).
        """
        B = self.micro_batch_size
        size = B * self.group_batches
        by_modality = self.group_by is GroupBy.modality_length
        for key, default in (("start", position["cursor"]), ("carry", []), ("end", None), ("emitted", 0)):
            position.setdefault(key, default)
        stream = enumerate(raw)

        def add(index: int, item: tuple[str, dict[str, Any]], pool: list[Indexed]) -> None:
            if (example := _example(item, self.processor, skips)) is not None:
                pool.append((index, example))

        def fill(pool: list[Indexed], n: int) -> None:
            while len(pool) < n:
                index, item = next(stream)
                position["cursor"] = index + 1
                add(index, item, pool)

        # Resume: re-process the samples the pools held at the saved position (in read order, as they were pooled);
        # skip the others unopened. A fresh start replays nothing.
        pool: list[Indexed] = []
        fresh: list[Indexed] = []
        carry, end = set(position["carry"]), position["end"]
        for index, item in itertools.islice(stream, position["cursor"]):
            if end is not None and index >= end:
                add(index, item, fresh)
            elif index >= position["start"] or index in carry:
                add(index, item, pool)
        while True:
            if position["end"] is None:
                fill(pool, size)
                position["end"] = position["cursor"]
            rng = random.Random(self._seed(worker, f"group:{position['start']}"))
            batches, leftover = group_by_length(pool, B, by_modality, rng)
            pool, fresh = leftover + fresh, []  # the next pool, in read order
            for k in range(position["emitted"], len(batches)):
                fill(pool, min(size, len(pool) + B))
                position["batches"] += 1
                position["emitted"] = k + 1
                if k + 1 == len(batches):
                    position.update(start=position["end"], carry=[index for index, _ in leftover], end=None, emitted=0)
                yield [example for _, example in batches[k]]


class EvalStream(IterableDataset):
    """One pass over evaluation sources, split across ranks and workers without overlap or loss.

    Ranks may get a different number of batches (shards differ in size): evaluation code must not run a
    collective per batch (e.g. ``log(..., sync_dist=True)`` in a step); aggregate at the end of the epoch.
    """

    def __init__(
        self,
        sources: list[Source],
        processor: Processor,
        collator: BatchCollator,
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
                yield from ((name, raw) for raw in iter_raw_samples([path], handler=skips.handler(name)))
            return
        # Every slot reads every shard here: only the first one counts read errors, so each counts once.
        first = self.rank * num_workers + worker == 0

        def handler(name: str) -> Callable[[Exception], bool]:
            return skips.handler(name) if first else keep_going

        every = ((name, raw) for name, path in shards for raw in iter_raw_samples([path], handler=handler(name)))
        yield from itertools.islice(every, self.rank * num_workers + worker, None, slots)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        skips = SkipCounter(f"eval rank {self.rank} worker {worker}", self.warn_interval_s)
        examples = _process(self._samples(worker, num_workers, skips), self.processor, skips)
        batch = list(itertools.islice(examples, self.micro_batch_size))
        while batch:
            # Read the next batch first, so that the last batch carries the counts of the worker's whole pass.
            following = list(itertools.islice(examples, self.micro_batch_size))
            out = self.collator(batch)
            out["_stream"] = {"split": VAL, "worker": worker, "counts": skips.counts.to_dict()}
            yield out
            batch = following
