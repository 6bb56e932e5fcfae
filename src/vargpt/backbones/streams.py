"""Image and text streams from shard sources, for the stage-0 recipes that pretrain backbones.

The VARGPT stages read whole conversations (vargpt.data.pipeline); the backbone recipes need parts of the same
shards. ``ImageItems``: every image of a sample becomes one item (the VQ-VAE reconstructs it, the class-
conditional VAR learns its codes given a class, the contrastive towers pair it with a caption); the caption is
``meta.captions[i]``, else the world's description of its attributes, else the first assistant reply; the
class is ``label_fn(attributes)`` (the shapes world: shape x colour of a one-object scene). ``TextItems``: the
sample's conversation as plain chat text, for the LLM to learn the language. Shards are drawn with
replacement, seeded by (seed, epoch, worker), and a fixed number of items makes an epoch, so the streams run
anywhere at any worker count.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vargpt.data.chat import SYSTEM_PROMPT
from vargpt.data.config import resolve_path
from vargpt.data.records import PLACEHOLDER_RE
from vargpt.data.shapes import COLOURS, SHAPES, Scene, describe
from vargpt.data.shards import iter_raw_samples, parse_record, shard_list
from vargpt.data.transforms import decode_image

LabelFn = Callable[[dict[str, Any] | None], int | None]


def shapes_class(attributes: dict[str, Any] | None) -> int | None:
    """The shapes world's class of a one-object scene: shape x colour (18 classes); None otherwise."""
    if not attributes or len(attributes.get("objects", ())) != 1:
        return None
    obj = attributes["objects"][0]
    return SHAPES.index(obj["shape"]) * len(COLOURS) + list(COLOURS).index(obj["colour"])


def shapes_class_name(label: int) -> tuple[str, str]:
    """(shape, colour) of a shapes-world class id."""
    return SHAPES[label // len(COLOURS)], list(COLOURS)[label % len(COLOURS)]


NUM_SHAPES_CLASSES = len(SHAPES) * len(COLOURS)


def _caption(record: dict[str, Any], index: int, attributes: dict[str, Any] | None) -> str:
    """A caption for the ``index``-th image of a record: explicit, from the world's attributes, or the reply."""
    captions = record.get("meta", {}).get("captions")
    if captions and index < len(captions):
        return captions[index]
    if attributes is not None:
        return describe(Scene.from_dict(attributes))
    replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return replies[0] if replies else ""


@dataclass
class ImageItem:
    image: torch.Tensor  # (3, S, S) after the transform
    caption: str
    label: int  # -1 when the image has no class


@dataclass
class ImageItems:
    """Record -> one ImageItem per image (``require_label`` drops images without a class)."""

    transform: Callable[[Any], torch.Tensor]
    label_fn: LabelFn | None = None
    require_label: bool = False

    def __call__(self, record: dict[str, Any], images: list[bytes]) -> Iterator[ImageItem]:
        attrs = record.get("meta", {}).get("attributes") or [None] * len(images)
        for i, data in enumerate(images):
            label = self.label_fn(attrs[i]) if self.label_fn else None
            if self.require_label and label is None:
                continue
            # A corrupt image raises here; ShardStream counts it and moves on.
            yield ImageItem(
                self.transform(decode_image(data)), _caption(record, i, attrs[i]), -1 if label is None else label
            )


@dataclass
class TextItems:
    """Record -> its conversation as chat text without image placeholders, tokenised (``max_length`` cap)."""

    tokenizer: Any
    max_length: int

    def __call__(self, record: dict[str, Any], images: list[bytes]) -> Iterator[torch.Tensor]:
        turns = [
            f"USER: {m['content']} ASSISTANT:" if m["role"] == "user" else f"{m['content']}{self.tokenizer.eos_token}"
            for m in record["messages"]
            if m["role"] in ("user", "assistant")
        ]
        text = PLACEHOLDER_RE.sub(" ", f"{SYSTEM_PROMPT} " + " ".join(turns))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length]
        yield torch.tensor(ids, dtype=torch.long)


class ShardStream(IterableDataset):
    """Items made by ``make_items`` from ``sources``, endless and seeded, ``items_per_epoch`` per epoch."""

    def __init__(
        self,
        sources: list[str],
        root: str | Path,
        make_items: Callable[[dict[str, Any], list[bytes]], Iterator[Any]],
        items_per_epoch: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
    ) -> None:
        super().__init__()
        self.shards = [p for s in sources for p, n in shard_list(resolve_path(s, root)) if n > 0]
        if not self.shards:
            raise ValueError(f"no shards with samples in {sources} (under {root})")
        self.make_items = make_items
        self.items_per_epoch = items_per_epoch
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _items(self, rng: random.Random) -> Iterator[Any]:
        while True:
            for raw in iter_raw_samples([rng.choice(self.shards)], handler=lambda exc: True):
                try:
                    record, images = parse_record(raw)
                    items = list(self.make_items(record, images))
                except Exception:  # a malformed record or corrupt image: skip and count, never stop the epoch
                    self.skipped += 1
                    continue
                yield from items

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = random.Random(f"items:{self.seed}:{self.epoch}:{worker}")
        n = self.items_per_epoch // workers + (worker < self.items_per_epoch % workers)
        buffer: list[Any] = []
        items = self._items(rng)
        while n > 0:
            while len(buffer) < self.shuffle_buffer:
                buffer.append(next(items))
            yield buffer.pop(rng.randrange(len(buffer)))
            n -= 1


def collate_images(items: list[ImageItem]) -> dict[str, Any]:
    return {
        "images": torch.stack([it.image for it in items]),
        "captions": [it.caption for it in items],
        "labels": torch.tensor([it.label for it in items], dtype=torch.long),
    }


def collate_texts(items: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``, labels = ids with -100 on padding."""
    ids = torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=pad_id)
    mask = torch.zeros_like(ids)
    for i, it in enumerate(items):
        mask[i, : len(it)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class StreamDataModule(LightningDataModule):
    """Train and validation streams of one item kind for a backbone recipe."""

    def __init__(
        self,
        root: str,
        train_sources: list[str],
        val_sources: list[str],
        train_items: Callable[[dict[str, Any], list[bytes]], Iterator[Any]],
        val_items: Callable[[dict[str, Any], list[bytes]], Iterator[Any]],
        collate: Callable[[list[Any]], dict[str, Any]],
        micro_batch_size: int,
        samples_per_epoch: int,
        val_samples: int,
        num_workers: int = 0,
        seed: int = 0,
        prepare: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.train_sources, self.val_sources = train_sources, val_sources
        self.train_items, self.val_items, self.collate = train_items, val_items, collate
        self.micro_batch_size = micro_batch_size
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.num_workers, self.seed = num_workers, seed
        self._prepare = prepare
        self.train_stream: ShardStream | None = None

    def prepare_data(self) -> None:
        if self._prepare is not None:
            self._prepare()

    def setup(self, stage: str | None = None) -> None:
        self.train_stream = ShardStream(
            self.train_sources, self.root, self.train_items, self.samples_per_epoch, self.seed
        )
        # Validation: the same items every time (fixed seed, epoch 0), so its figures compare across steps.
        self.val_stream = ShardStream(self.val_sources, self.root, self.val_items, self.val_samples, self.seed + 1)

    def _loader(self, stream: ShardStream) -> DataLoader:
        return DataLoader(
            stream, batch_size=self.micro_batch_size, num_workers=self.num_workers, collate_fn=self.collate
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_stream is not None
        return self._loader(self.train_stream)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_stream)
