"""Each rank reads only what it holds: a whole-VARGPT checkpoint loaded into a model already sharded with FSDP2.

The caller (``vargpt.training.materialize``) built the model on the meta device, sharded it and materialised
the local shards (``to_empty``); :func:`fill_local_shards` then copies in what :func:`plan_whole_load
<vargpt.checkpoint.load.plan_whole_load>` planned:

* a sharded parameter (a ``DTensor``, ``Shard(0)`` as FSDP2 places it) gets the rows of its local shard: from
  a safetensors file one byte range read into memory (rows of a C-contiguous tensor are contiguous; plain reads,
  not the file's memory map, so the pages read do not stay in the rank's resident memory), rows of a
  memory-mapped torch file, or, for our own sharded (torch distributed checkpoint) folders, one collective
  ``torch.distributed.checkpoint.load`` that reads only the chunks overlapping each rank's shards;
* a tensor FSDP leaves whole (the frozen VQ-VAE, which sharding ignores, and every buffer) is read whole, with
  ``apply_load``'s rule for deterministic buffers (a disagreeing checkpoint value keeps the model's).

The values equal those of ``load_weights`` into the whole model followed by sharding, bit for bit: the same
keys, the same casts (``copy_``), only fewer bytes read per rank.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vargpt.checkpoint.io import RenamedSource, SafetensorsSource, TensorSource
from vargpt.checkpoint.match import DETERMINISTIC_BUFFERS
from vargpt.checkpoint.report import LoadReport

# Lightning's sharded checkpoints keep the model under this entry (the optimizer states beside it).
DCP_STATE_PREFIX = "state_dict."


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A torch distributed checkpoint folder (Lightning's sharded ``.ckpt`` under FSDP)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


class DistributedCheckpointSource(TensorSource):
    """The model tensors of a torch distributed checkpoint folder: keys, shapes and dtypes from its metadata;
    ``source[key]`` reads one whole tensor on this process alone."""

    def __init__(self, folder: str | Path, prefix: str = DCP_STATE_PREFIX) -> None:
        # Here, not at the top: torch builds without distributed support lack it.
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder, self.prefix, self.label = Path(folder), prefix, str(folder)
        entries = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        self._meta = {
            k[len(prefix) :]: (tuple(m.size), m.properties.dtype)
            for k, m in entries.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read({key: torch.empty(self.shape(key), dtype=self.dtype(key))}, collective=False)[key]

    def __iter__(self) -> Any:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def read(self, targets: dict[str, torch.Tensor], *, collective: bool) -> dict[str, torch.Tensor]:
        """Fill ``targets`` (checkpoint key -> tensor or DTensor, in place) and return them. ``collective``: every
        rank calls with its own shards (DCP plans the reads together); else this process reads alone."""
        from torch.distributed.checkpoint import load

        load({self.prefix + k: t for k, t in targets.items()}, checkpoint_id=str(self.folder), no_dist=not collective)
        return targets


def open_for_sharded_load(path: str | Path) -> str | Path | TensorSource:
    """What ``plan_whole_load`` takes for ``path``: a distributed checkpoint folder opened on its metadata, any
    other path as it is (``load_weights`` opens it)."""
    return DistributedCheckpointSource(path) if is_distributed_checkpoint(path) else path


def base_key(source: TensorSource, key: str) -> tuple[TensorSource, str]:
    """The source that holds ``key`` under renamed views (``as_released``, ``subset``) and its name there."""
    while isinstance(source, RenamedSource):
        source, key = source.base, source.names[key]
    return source, key


def read_rows(source: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (first dimension) of ``source[key]``, reading only those where the format allows."""
    base, name = base_key(source, key)
    if isinstance(base, SafetensorsSource):
        return _pread_rows(base._where[name], name, base.shape(name), base.dtype(name), start, stop)
    # A memory-mapped torch file (or tensors already in memory): slicing touches only those rows' pages.
    return base[name][start:stop]


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, the JSON header) of a safetensors file, parsed once per version of it."""
    stat = path.stat()
    return _parsed_header(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _parsed_header(path: Path, mtime_ns: int, size: int) -> tuple[int, dict[str, Any]]:
    """The header of ``path`` (``mtime_ns`` and ``size`` only key the cache: a rewritten file is parsed again)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _pread_rows(
    path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype, start: int, stop: int
) -> torch.Tensor:
    """Rows ``start:stop`` of a safetensors tensor, read with plain file reads: rows of a C-contiguous tensor are
    one byte range. Not through safetensors' memory map, whose touched pages would count in this process's
    resident memory until it exits (the page cache holds them either way)."""
    data, header = _safetensors_header(path)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
    with open(path, "rb") as f:
        f.seek(data + header[key]["data_offsets"][0] + start * row_bytes)
        f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
    return out


def shard_rows(param: Any) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the full tensor that this rank's shard of an FSDP2 parameter holds."""
    from torch.distributed.tensor import Shard

    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise ValueError(f"expected FSDP2's Shard(0) placement on a 1-D mesh, got {param.placements}")
    # torch.chunk's split, as FSDP2 shards: ceil(n / ranks) rows each, the last ranks may get fewer or none.
    rows, ranks = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // ranks)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if stop - start != param.to_local().shape[0]:
        raise ValueError(f"shard of {tuple(param.shape)}: rows {start}:{stop}, local {tuple(param.to_local().shape)}")
    return start, stop


def copy_local_part(param: Any, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole value ``full`` into ``param`` (its shard's rows, or all of it)."""
    if hasattr(param, "to_local"):
        start, stop = shard_rows(param)
        param.to_local().copy_(full[start:stop])
    else:
        param.copy_(full)


@torch.no_grad()
def fill_local_shards(model: nn.Module, source: TensorSource, report: LoadReport) -> None:
    """Copy ``report.loaded`` from ``source`` (released names, as planned) into the materialised ``model``, each
    rank reading its own shards' rows and, whole, what FSDP did not shard."""
    from torch.distributed.tensor import DTensor

    refs = model.state_dict(keep_vars=True)
    sharded = [k for k in report.loaded if isinstance(refs[k], DTensor)]
    whole = [k for k in report.loaded if not isinstance(refs[k], DTensor)]
    for key, value in _read_whole(source, whole, refs).items():
        dst = refs[key]
        if DETERMINISTIC_BUFFERS.fullmatch(key) and not torch.equal(value.to(dst.dtype), dst.cpu()):
            report.notes.append(f"{key}: the checkpoint's value differs from the one computed from the config; kept")
            continue
        dst.copy_(value)
    _read_shards(source, {k: refs[k] for k in sharded})


def _read_whole(source: TensorSource, keys: list[str], refs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{key: whole tensor}`` for ``keys``; a distributed checkpoint's in one read."""
    if not keys:
        return {}
    base, _ = base_key(source, keys[0])
    if isinstance(base, DistributedCheckpointSource):
        names = {k: base_key(source, k)[1] for k in keys}
        got = base.read(
            {names[k]: torch.empty(base.shape(names[k]), dtype=base.dtype(names[k])) for k in keys}, collective=False
        )
        return {k: got[names[k]] for k in keys}
    return {k: _read_all(source, k) for k in keys}


def _read_all(source: TensorSource, key: str) -> torch.Tensor:
    """``source[key]``; a safetensors tensor with plain file reads (see ``_pread_rows``)."""
    shape = source.shape(key)
    if isinstance(base_key(source, key)[0], SafetensorsSource) and shape:
        return read_rows(source, key, 0, shape[0])
    return source[key]


def _read_shards(source: TensorSource, params: dict[str, Any]) -> None:
    """Fill each DTensor of ``params`` (key -> parameter) with its local rows of ``source[key]``."""
    if not params:
        return
    base, _ = base_key(source, next(iter(params)))
    if isinstance(base, DistributedCheckpointSource):
        # DTensor targets: DCP reads the chunks that overlap this rank's shard, whatever the saving mesh was.
        base.read({base_key(source, k)[1]: p for k, p in params.items()}, collective=True)
        return
    for key, param in params.items():
        start, stop = shard_rows(param)
        param.to_local().copy_(read_rows(source, key, start, stop))
