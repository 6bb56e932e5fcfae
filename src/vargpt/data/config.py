"""Typed schema of a data config (``conf/data/*.yaml``): sources and their mixture, batching, workers, resume.

The training app registers :class:`DataConfig` with Hydra's ConfigStore (as part of its root schema), so a
misspelt key in a YAML file or on the command line fails at compose time naming the key. Every field has a
default so the root schema can build an empty one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING


def resolve_path(path: str, root: str | Path) -> Path:
    """A config path: absolute as given, relative under ``data.root``."""
    return Path(path) if Path(path).is_absolute() else Path(root) / path


class GroupBy(Enum):
    """How the training stream forms micro batches (``data.group_by``)."""

    # In stream order (the shuffle buffer's).
    none = "none"
    # From a pool of samples sorted by token count (LLaVA's ``group_by_length``): less padding.
    length = "length"
    # The same within each modality: understanding-only and generation samples never share a micro batch
    # (LLaVA's ``group_by_modality_length``, with generation targets as the second modality).
    modality_length = "modality_length"


@dataclass
class SourceConfig:
    """One shard source: a folder holding ``manifest.json`` and its shards (converted by ``data_prep/``)."""

    # Folder, relative to data.root unless absolute.
    path: str = MISSING
    # Training mixture weight; null = proportional to the source's num_samples (what concatenating datasets
    # does, as VARGPT's LLaMA-Factory training did). 0 = the source is not used (in evaluation either);
    # evaluation streams ignore other values and read every sample once.
    weight: float | None = None


@dataclass
class ShapesWorldConfig:
    """The embedded shapes world, built under data.root/dir when missing (``vargpt.data.shapes``)."""

    dir: str = "shapes"
    size: int = 64
    train: int = 20000
    val: int = 1000
    seed: int = 0
    # Processes for building it (rendering + PNG encoding).
    num_workers: int = 2


@dataclass
class DataConfig:
    """A data mix for one stage: where the shards are, how to mix, batch and stream them."""

    name: str = "shapes"
    # Base folder of relative source paths (the training app sets it to paths.data_dir).
    root: str = "data"
    # Set to build the shapes world when it is missing; null for real data.
    shapes: ShapesWorldConfig | None = None
    # Name -> source; names label samples in batch meta and per-source metrics.
    train_sources: dict[str, SourceConfig] = field(default_factory=dict)
    val_sources: dict[str, SourceConfig] = field(default_factory=dict)
    # A "virtual epoch": samples per epoch over all ranks (checkpoints, schedules and evaluation follow it).
    samples_per_epoch: int = 20000
    # Samples per batch per rank (the stage derives gradient accumulation from its global batch size).
    micro_batch_size: int = 8
    # Evaluation batch size; null = micro_batch_size.
    val_micro_batch_size: int | None = None
    # DataLoader worker processes per rank (0 = in the training process); batches are built in the workers.
    num_workers: int = 2
    prefetch_factor: int = 2
    # Pinned host memory (only used when a GPU is present).
    pin_memory: bool = True
    # Seeds shard choice, mixture draws and shuffling (with epoch, rank and worker): same seed, same stream.
    seed: int = 0
    # Samples held by each worker's shuffle buffer (raw bytes; images are decoded after shuffling).
    shuffle_buffer: int = 1000
    # Samples buffered before the first one is released.
    shuffle_initial: int = 100
    # Longest sequence after placeholder expansion; longer samples are cut before the image block the cut
    # would split, or skipped and counted when nothing trainable would remain.
    cutoff_len: int = 2048
    pad_to_multiple_of: int = 8
    # Length-grouped batching of the training stream (vargpt.data.pipeline.group_by_length): none | length |
    # modality_length. Each worker sorts a pool of micro_batch_size x group_batches samples by length (per modality)
    # and cuts it into micro batches, served in a seeded random order; resume stays exact.
    group_by: GroupBy = GroupBy.none
    # Micro batches per pool (>= 2): larger pools group more tightly, hold more decoded samples per worker and
    # take longer to rebuild on resume.
    group_batches: int = 16
    # Understanding images above this many pixels are first shrunk with NEAREST, keeping their aspect, before
    # CLIP's resize: the release's training images (LLaMA-Factory's image_resolution, 512 x 512 = 262144).
    # null or 0 = no cap. Generation targets always get the release's cap (vargpt.data.transforms.var_transform).
    und_max_pixels: int | None = 512 * 512
    # VAR's random crop of generation targets in training (false = centre crop).
    gen_random_crop: bool = True
    # Generation targets' shortest side is resized to gen_resize_ratio x R before the crop: VAR's 1.125 for
    # photographs; 1.0 for images made at the model's size (the shapes world), which a resize would only ring
    # and a crop could cut.
    gen_resize_ratio: float = 1.125
    # Serve generation targets as precomputed VQ codes (``gen_codes``, written by data_prep/encode_gen_codes.py)
    # instead of decoding and transforming their pixels; a generation sample without codes is skipped and counted
    # (codes_missing). Codes are of the centre crop: no random-crop augmentation.
    gen_codes: bool = False
    # Preference pairs (DPO): every sample is a pair record (records.check_pair; data_prep/preference_to_shards.py)
    # processed into a chosen and a rejected row; micro_batch_size and samples_per_epoch count pairs, a batch holds
    # 2 x micro_batch_size rows (vargpt.data.collate.PairCollator). Samples that are not pairs are skipped and
    # counted (not_a_pair). Length grouping sorts pairs by their longer row.
    pairs: bool = False
    # What pairs are compared on (stage.preference.target): with "image", a pair whose chosen or rejected response
    # generates no image is skipped and counted (no_image_target); "text" or null keeps every pair.
    pair_target: str | None = None
    # Seconds between two warnings about skipped samples or unreadable shards (counts are always kept).
    warn_interval_s: float = 60.0
    # A shard a source's manifest lists but that is absent stops the run; true = stream the shards present (a
    # warning names the missing ones, the run summary lists them).
    allow_missing_shards: bool = False
    # Largest share of a source's samples that may be skipped (corrupt, unreadable, too long, ...) before the run
    # stops with an error naming the source and the reasons; 1.0 = never stop (counts are still reported).
    max_bad_sample_rate: float = 0.01
    # Samples a source must have given (on one rank, since the process started) before its rate is checked.
    bad_sample_min_samples: int = 1000


@dataclass(frozen=True)
class ModelInputs:
    """What the data pipeline must know of the model: its tokenizer folder, the understanding images' token count
    and preprocessing, and the generation targets' size and VQ schedule. Read off a model config with
    :meth:`of`, so that ``data/`` needs nothing from ``model/`` but the token ids."""

    tokenizer: str | None
    num_image_tokens: int  # tokens per <image> block
    image_size: int  # the vision tower's input side
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    gen_image_size: int  # side R of a generation target
    patch_nums: tuple[int, ...]  # the VQ-VAE's scales
    gen_vocab_size: int  # the VQ codebook's size

    @property
    def num_gen_tokens(self) -> int:
        """Pad tokens per <image_gen> block: L = sum of the scales' patch counts."""
        return sum(p * p for p in self.patch_nums)

    @classmethod
    def of(cls, model: Any) -> ModelInputs:
        """From a typed model config (``vargpt.model.config.ModelConfig`` or any object with its ``tokenizer``,
        ``vision`` and ``vqvae`` fields); a ModelInputs is returned as it is."""
        if isinstance(model, ModelInputs):
            return model
        vision, vqvae = model.vision, model.vqvae
        return cls(
            tokenizer=model.tokenizer,
            num_image_tokens=vision.num_image_tokens,
            image_size=vision.image_size,
            image_mean=tuple(vision.image_mean),
            image_std=tuple(vision.image_std),
            gen_image_size=vqvae.image_size,
            patch_nums=tuple(vqvae.patch_nums),
            gen_vocab_size=vqvae.vocab_size,
        )


def check_data_config(cfg: DataConfig | Any, key: str = "data") -> None:
    """Ranges the types cannot express (``cfg``: a DataConfig or its DictConfig); raises naming the key."""
    if cfg.pair_target not in (None, "image", "text"):
        raise ValueError(f"{key}.pair_target={cfg.pair_target!r}: expected image, text or null")
    if not 0.0 <= cfg.max_bad_sample_rate <= 1.0:
        raise ValueError(f"{key}.max_bad_sample_rate must be in [0, 1] (1 = never stop), got {cfg.max_bad_sample_rate}")
    if cfg.bad_sample_min_samples < 1:
        raise ValueError(f"{key}.bad_sample_min_samples must be >= 1, got {cfg.bad_sample_min_samples}")
    if (cfg.und_max_pixels or 0) < 0:
        raise ValueError(
            f"{key}.und_max_pixels must be a pixel count (the release's: 262144 = 512 x 512), or null or 0 for no "
            f"cap; got {cfg.und_max_pixels}"
        )
