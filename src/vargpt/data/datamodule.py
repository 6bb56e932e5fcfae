"""The LightningDataModule: a data config plus the model's facts -> training and evaluation loaders.

Build it with :meth:`VARGPTDataModule.from_config` (``data_cfg``: ``conf/data/*.yaml`` as a ``DataConfig`` or a
DictConfig; ``model``: a ``ModelInputs`` or a typed model config it is read from, which gives the image-token
counts and image sizes). With ``data.pairs`` both streams read preference pairs (``vargpt.data.pairs``) and
batch them as chosen and rejected rows (``collate.PairCollator``). It builds the
shapes world when the config asks for it and it is missing (``prepare_data``), streams batches built in the
workers, and saves the training stream's position in checkpoints: ``state_dict`` holds every rank's worker
positions (gathered when torch.distributed runs) and ``load_state_dict`` resumes exactly when the epoch,
seed, world size, worker count and length grouping match, else approximately (same number of remaining batches,
new draws).

Positions are recorded in ``on_before_batch_transfer``, which Lightning calls when the training loop takes a
batch (not when the loader prefetches it); a LightningModule should not override that hook as well.

Skipped samples, by source and reason (``vargpt.data.stream_sources.StreamCounts``), are counted where they are
processed, in each DataLoader worker; every batch carries its worker's counts of the epoch (training) or pass
(evaluation) so far, and the same hook keeps the latest per worker. :meth:`local_counts` sums this rank's
workers (training: over the epochs of this process), :meth:`run_counts` sums the ranks (training: plus the
totals saved in the checkpoint resumed from, so a run's count survives its resumes) and checkpoints carry it.
Samples a worker processed for batches the loop has not taken yet are not counted until it takes them, and an
evaluation worker whose every sample was skipped makes no batch, so only its log warnings tell. Each
batch taken also checks this rank's counts against ``data.max_bad_sample_rate`` (``check_bad_rate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vargpt.data.collate import Collator, PairCollator
from vargpt.data.config import DataConfig, ModelInputs, SourceConfig, check_data_config, resolve_path
from vargpt.data.pairs import PairProcessor
from vargpt.data.pipeline import EvalStream, SampleProcessor, TrainStream
from vargpt.data.shapes import ensure_shapes_world
from vargpt.data.shards import GEN_CODES, read_manifest
from vargpt.data.stream_sources import TRAIN, VAL, StreamCounts, check_bad_rate, load_sources
from vargpt.data.tokenizer import load_tokenizer
from vargpt.data.transforms import VAR_RESIZE_RATIO, clip_transform, var_transform
from vargpt.tokens import SpecialTokenIds

log = logging.getLogger(__name__)

# Entries of a batch's ``_stream`` that are not part of the training stream's position.
_NOT_POSITION = ("split", "epoch", "worker", "counts")


def _to_object(cfg: Any, schema: type) -> Any:
    """A config dataclass from a dataclass or a (Hydra) DictConfig, validated against ``schema``."""
    if isinstance(cfg, schema):
        return cfg
    if isinstance(cfg, DictConfig):
        # Resolve while the node still sits in its root config (``${paths.data_dir}`` and the like).
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    raise TypeError(f"expected {schema.__name__} or a DictConfig, got {type(cfg).__name__}")


class _EpochLoader(DataLoader):
    """A DataLoader that tells the data module when an iteration starts (to seed an epoch, resume, reset counts)."""

    def __init__(self, *args: Any, begin_epoch: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.begin_epoch = begin_epoch

    def __iter__(self) -> Iterator[Any]:
        self.begin_epoch()
        return super().__iter__()


class VARGPTDataModule(LightningDataModule):
    """Training and evaluation streams of one data config (see the module docstring)."""

    def __init__(self, cfg: DataConfig, model: ModelInputs, tokenizer: Any = None) -> None:
        super().__init__()
        check_data_config(cfg)
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.train_stream: TrainStream | None = None
        self.val_stream: EvalStream | None = None
        self._next_epoch = 0
        self._epoch = 0
        # This rank's worker positions in the current epoch, as reported by the batches the loop took.
        self._positions: dict[int, dict[str, Any]] = {}
        # Per split, each worker's counts of the current epoch or pass, as reported by the batches the loop took.
        self._counts: dict[str, dict[int, StreamCounts]] = {TRAIN: {}, VAL: {}}
        # This rank's training counts of the epochs finished in this process.
        self._train_done = StreamCounts()
        # Every rank's training counts up to the checkpoint this run resumed from.
        self._restored = StreamCounts()
        self._pending: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, data_cfg: DataConfig | DictConfig, model: Any, tokenizer: Any = None) -> VARGPTDataModule:
        """Build from the data config and the model's facts (a ``ModelInputs``, or a typed model config such as
        ``vargpt.model.config.ModelConfig``). ``tokenizer`` = None loads ``model.tokenizer`` (a local folder),
        or the shapes world's own tokenizer when the data config has a shapes world."""
        return cls(_to_object(data_cfg, DataConfig), ModelInputs.of(model), tokenizer)

    # -------------------------------------------------------------------------------------------- set-up
    def prepare_data(self) -> None:
        shapes = self.cfg.shapes
        if shapes is not None:
            ensure_shapes_world(
                resolve_path(shapes.dir, self.cfg.root),
                shapes.size,
                shapes.train,
                shapes.val,
                shapes.seed,
                shapes.num_workers,
            )

    def _load_tokenizer(self) -> Any:
        if self.model.tokenizer:
            return load_tokenizer(self.model.tokenizer)
        if self.cfg.shapes is not None:
            return load_tokenizer(resolve_path(self.cfg.shapes.dir, self.cfg.root) / "tokenizer")
        raise ValueError("no tokenizer: pass one, or set model.tokenizer to the LLM checkpoint's local folder")

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def processor(self, train: bool) -> SampleProcessor | PairProcessor:
        """A split's sample processor: conversations, or preference pairs (``data.pairs``) made of the same rows."""
        model = self.model
        rows = SampleProcessor(
            tokenizer=self.tokenizer,
            ids=SpecialTokenIds.from_tokenizer(self.tokenizer),
            num_image_tokens=model.num_image_tokens,
            num_gen_tokens=model.num_gen_tokens,
            cutoff_len=self.cfg.cutoff_len,
            # The release's training data path caps every image before CLIP (its evaluation split too).
            und_transform=clip_transform(model.image_size, model.image_mean, model.image_std, self.cfg.und_max_pixels),
            gen_transform=var_transform(
                model.gen_image_size, train=train and self.cfg.gen_random_crop, resize_ratio=self.cfg.gen_resize_ratio
            ),
            gen_codes=self.cfg.gen_codes,
        )
        return PairProcessor(rows, self.cfg.pair_target) if self.cfg.pairs else rows

    def source_dirs(self) -> dict[str, Path]:
        """The folders of the sources the run reads (weight not 0), by name (validation ones as ``val/<name>``)."""
        sources = {**self.cfg.train_sources, **{f"val/{k}": v for k, v in self.cfg.val_sources.items()}}
        return {name: resolve_path(s.path, self.cfg.root) for name, s in sources.items() if s.weight != 0}

    def _check_codes(self, sources: dict[str, SourceConfig]) -> None:
        """With ``data.gen_codes``: the sources' codes must be of the model's VQ-VAE schedule and vocabulary and of
        targets resized by ``data.gen_resize_ratio``; a source without codes is named (its generation samples, if
        any, will be skipped as codes_missing)."""
        expected = {
            "patch_nums": list(self.model.patch_nums),
            "vocab_size": self.model.gen_vocab_size,
            "image_size": self.model.gen_image_size,
            "resize_ratio": self.cfg.gen_resize_ratio,
        }
        for name, source in sources.items():
            if source.weight == 0:
                continue
            block = read_manifest(resolve_path(source.path, self.cfg.root)).get(GEN_CODES)
            if block is None:
                log.warning("data.gen_codes: source %s has no codes; its generation samples will be skipped", name)
                continue
            found = {key: block.get(key) for key in expected}
            # Codes written before the ratio was recorded were made with VAR's.
            found["resize_ratio"] = block.get("resize_ratio", VAR_RESIZE_RATIO)
            if found != expected:
                raise ValueError(
                    f"source {name}: its codes are of a VQ-VAE with {found}, the model's has {expected}; "
                    "re-encode it with data_prep/encode_gen_codes.py (--resize-ratio = data.gen_resize_ratio)"
                )

    def setup(self, stage: str | None = None) -> None:
        # Fork-based workers inherit the tokenizer; its Rust thread pool must not be used across the fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        rows = Collator(SpecialTokenIds.from_tokenizer(self.tokenizer).pad, self.cfg.pad_to_multiple_of)
        collator = PairCollator(rows) if self.cfg.pairs else rows
        rank, world_size = self._rank_world()
        cfg = self.cfg
        if cfg.gen_codes:
            self._check_codes({**cfg.train_sources, **{f"val/{k}": v for k, v in cfg.val_sources.items()}})
        if stage in (None, "fit") and cfg.train_sources:
            self.train_stream = TrainStream(
                load_sources(cfg.train_sources, cfg.root, "data.train_sources", cfg.allow_missing_shards),
                self.processor(train=True),
                collator,
                micro_batch_size=cfg.micro_batch_size,
                samples_per_epoch=cfg.samples_per_epoch,
                num_workers=cfg.num_workers,
                seed=cfg.seed,
                rank=rank,
                world_size=world_size,
                shuffle_buffer=cfg.shuffle_buffer,
                shuffle_initial=cfg.shuffle_initial,
                warn_interval_s=cfg.warn_interval_s,
                group_by=cfg.group_by,
                group_batches=cfg.group_batches,
            )
        if cfg.val_sources:
            self.val_stream = EvalStream(
                load_sources(cfg.val_sources, cfg.root, "data.val_sources", cfg.allow_missing_shards),
                self.processor(train=False),
                collator,
                micro_batch_size=cfg.val_micro_batch_size or cfg.micro_batch_size,
                rank=rank,
                world_size=world_size,
                warn_interval_s=cfg.warn_interval_s,
            )

    # -------------------------------------------------------------------------------------------- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.cfg.num_workers
        return {
            "batch_size": None,  # batches are made in the workers
            "num_workers": workers,
            "pin_memory": self.cfg.pin_memory and torch.cuda.is_available(),
            "prefetch_factor": self.cfg.prefetch_factor if workers > 0 else None,
            # Workers are re-created every epoch so they see the new epoch's seed (set in _begin_epoch).
            "persistent_workers": False,
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            raise RuntimeError("no training sources: set data.train_sources (and call setup('fit'))")
        return _EpochLoader(self.train_stream, begin_epoch=self._begin_epoch, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        if self.val_stream is None:
            raise RuntimeError("no evaluation sources: set data.val_sources")
        return _EpochLoader(self.val_stream, begin_epoch=self._begin_pass, **self._loader_kwargs())

    def _begin_pass(self) -> None:
        """An evaluation pass starts: its counts start from zero."""
        self._counts[VAL] = {}

    def _begin_epoch(self) -> None:
        """Seed the epoch about to be iterated and apply a pending resume position."""
        assert self.train_stream is not None
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
        else:
            epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        positions = self._resume_positions(epoch)
        self._train_done = self.local_counts(TRAIN)
        self._epoch, self._positions, self._counts[TRAIN] = epoch, positions, {}
        self.train_stream.set_epoch(epoch, positions)

    def _resume_positions(self, epoch: int) -> dict[int, dict[str, Any]]:
        """Worker positions to start ``epoch`` from: exact, approximate (see module docstring), or none."""
        state, self._pending = self._pending, None
        if state is None:
            return {}
        if state["epoch"] != epoch:
            log.info("the saved stream position is of epoch %d; epoch %d starts afresh", state["epoch"], epoch)
            return {}
        stream = self.train_stream
        assert stream is not None
        mine = state["positions"].get(stream.rank)
        saved = (state["seed"], state["world_size"], state["num_workers"], state.get("grouping", "none"))
        same = saved == (stream.seed, stream.world_size, stream.num_workers, stream.grouping)
        if same and mine is not None:
            log.info("resuming the training stream exactly at epoch %d, positions %s", epoch, mine)
            return {int(w): dict(p) for w, p in mine.items()}
        # Batch counts are the same on every rank (equal quotas), so any rank's entry gives the count.
        done = sum(p["batches"] for p in next(iter(state["positions"].values())).values())
        log.warning(
            "resuming the training stream approximately: %d batches of epoch %d done, the rest drawn afresh "
            "(saved with seed/world size/workers/grouping %s)",
            done,
            epoch,
            saved,
        )
        per_worker, extra = divmod(done, stream.num_workers)
        return {w: {"cursor": 0, "batches": per_worker + (w < extra)} for w in range(stream.num_workers)}

    # -------------------------------------------------------------------------------------------- position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position and counts of a batch the loop takes, drop them from the batch, check the rate."""
        stream = batch.pop("_stream", None) if isinstance(batch, dict) else None
        if stream is None or (stream["split"] == TRAIN and stream["epoch"] != self._epoch):
            return batch
        split, worker = stream["split"], stream["worker"]
        if split == TRAIN:
            self._positions[worker] = {k: v for k, v in stream.items() if k not in _NOT_POSITION}
        self._counts[split][worker] = StreamCounts.from_dict(stream["counts"])
        check_bad_rate(self.local_counts(split), split, self.cfg.max_bad_sample_rate, self.cfg.bad_sample_min_samples)
        return batch

    def local_counts(self, split: str) -> StreamCounts:
        """This rank's counts (``split``: ``train`` or ``val``), summed over its workers: training since this
        process started, evaluation of the current or last pass."""
        current = StreamCounts.total(self._counts[split].values())
        return self._train_done + current if split == TRAIN else current

    def run_counts(self, split: str) -> StreamCounts:
        """Every rank's counts: training since the run started (resumes included), evaluation of the current or
        last pass. A collective under torch.distributed: every rank must call it."""
        local = self.local_counts(split).to_dict()
        parts: list[Any] = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
        total = StreamCounts.total(StreamCounts.from_dict(part) for part in parts)
        return self._restored + total if split == TRAIN else total

    def missing_shards(self) -> dict[str, list[str]]:
        """``split/source`` -> the shards left out under ``data.allow_missing_shards`` (only sources with some)."""
        streams = {TRAIN: self.train_stream, VAL: self.val_stream}
        return {
            f"{split}/{source.name}": [path for path, _ in source.missing]
            for split, stream in streams.items()
            if stream is not None
            for source in stream.sources
            if source.missing
        }

    def state_dict(self) -> dict[str, Any]:
        stream = self.train_stream
        if stream is None:
            return {}
        positions: dict[int, dict[int, dict[str, Any]]] = {stream.rank: dict(self._positions)}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and stream.world_size > 1:
            # Checkpoints are written by rank 0: gather every rank's positions (all ranks dump the state).
            gathered: list[Any] = [None] * stream.world_size
            torch.distributed.all_gather_object(gathered, positions)
            positions = {r: p for part in gathered for r, p in part.items()}
        return {
            "epoch": self._epoch,
            "seed": stream.seed,
            "world_size": stream.world_size,
            "num_workers": stream.num_workers,
            "grouping": stream.grouping,
            "positions": positions,
            "counts": self.run_counts(TRAIN).to_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._pending = state_dict
        self._restored = StreamCounts.from_dict(state_dict.get("counts", {}))
        self._next_epoch = state_dict["epoch"]
        self._epoch = state_dict["epoch"]
