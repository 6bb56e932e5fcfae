"""Safe reading and writing of weight files: safetensors (single or sharded with an index) and torch ``.pth``.

Nothing here unpickles arbitrary objects. ``.pth``/``.pt``/``.bin``/``.ckpt`` files go through
``torch.load(weights_only=True)`` (passed explicitly, so no environment variable can turn it off), whose
restricted unpickler refuses any global outside tensors, dicts, lists and numbers: a pickle built to run code
raises :class:`UnsafeCheckpointError` before anything runs. Every other format is refused by name. A file cut
short or damaged (an interrupted write or copy) raises :class:`CorruptCheckpointError` naming it.

Reading is lazy where the format allows: :class:`TensorSource` gives keys, shapes and dtypes without reading
the data, so a 9 B checkpoint can be checked against a model built on the meta device and copied shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Keys under which training frameworks nest the weights inside a .pth/.ckpt dict (Lightning, DeepSpeed, VAR).
_NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that would need arbitrary unpickling (code execution) to read; it was not read."""


class CheckpointFormatError(ValueError):
    """A path that is not a checkpoint this package reads (wrong suffix, no weights in a folder, bad index)."""


class CorruptCheckpointError(CheckpointFormatError):
    """A checkpoint file that is cut short or damaged (an interrupted write or copy): it cannot be read."""


def _corrupt(path: Path, err: BaseException) -> CorruptCheckpointError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CorruptCheckpointError(
        f"{path}: cannot be read, the file is cut short or damaged ({reason}); an interrupted write or copy "
        "leaves such a file. Copy or export it again, or use another checkpoint"
    )


# ---------------------------------------------------------------------------------------------- sources
class TensorSource(Mapping[str, torch.Tensor]):
    """A read-only, possibly lazy ``{key: tensor}`` view of a checkpoint, with shapes and dtypes up front."""

    label: str = "<tensors>"

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def nbytes(self, key: str) -> int:
        return self.numel(key) * _itemsize(self.dtype(key))

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (self.shape(k), self.dtype(k)) for k in self}


class MemorySource(TensorSource):
    """Tensors already in memory (a loaded .pth, or a state dict handed over by the caller)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "<state dict>") -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointFormatError(f"{label}: entries that are not tensors: {bad[:10]}")
        self._t = dict(tensors)
        self.label = label

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._t[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype


class SafetensorsSource(TensorSource):
    """One or more safetensors files; tensors are read on access, headers only at open."""

    def __init__(self, weight_map: Mapping[str, Path], label: str) -> None:
        self.label = label
        self._files: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in dict.fromkeys(weight_map.values()):
            if not path.is_file():
                raise CheckpointFormatError(f"{label}: shard {path} listed in the index is missing")
            handle = _open_safetensors(path)
            self._files[path] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if weight_map.get(key, path) != path:
                    continue  # the index assigns this key to another shard
                sl = handle.get_slice(key)
                self._where[key] = path
                self._meta[key] = (tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()])
        missing = [k for k in weight_map if k not in self._where]
        if missing:
            raise CheckpointFormatError(
                f"{label}: keys listed in the index but absent from their shard: {missing[:10]}"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._files[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]


class RenamedSource(TensorSource):
    """A view of another source under new names: ``names`` maps new key -> key in ``base``."""

    def __init__(self, base: TensorSource, names: Mapping[str, str], label: str | None = None) -> None:
        self.base, self.names = base, dict(names)
        self.label = base.label if label is None else label

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.base[self.names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(self.names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(self.names[key])


def subset(source: TensorSource, prefix: str, label: str | None = None) -> RenamedSource:
    """The keys under ``prefix`` (e.g. ``"vargpt_gen."``), with the prefix removed."""
    names = {k[len(prefix) :]: k for k in source if k.startswith(prefix)}
    return RenamedSource(source, names, label=label or f"{source.label} [{prefix}*]")


def with_prefix(source: TensorSource, prefix: str) -> RenamedSource:
    """Every key of ``source`` with ``prefix`` put in front."""
    return RenamedSource(source, {prefix + k: k for k in source})


# ---------------------------------------------------------------------------------------------- reading
def open_checkpoint(path: str | Path) -> TensorSource:
    """Open a checkpoint file or an HF-style folder as a :class:`TensorSource` (safely; see the module doc).

    A folder may hold ``model.safetensors.index.json`` + shards, ``model.safetensors``, other ``*.safetensors``
    files, or (older HF saves) ``pytorch_model.bin[.index.json]``. A file must end in ``.safetensors`` or in one
    of ``.pth .pt .bin .ckpt``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsSource(_single_file_map(path), label=str(path))
    if name.endswith(".index.json"):
        return _open_index(path)
    if name.endswith(TORCH_SUFFIXES):
        return MemorySource(load_torch_file(path), label=str(path))
    raise CheckpointFormatError(
        f"{path}: unsupported checkpoint format; this loader reads only .safetensors (optionally sharded with "
        f"an index) and torch files ({', '.join(TORCH_SUFFIXES)}) with weights_only=True"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in memory (convenience over :func:`open_checkpoint`)."""
    src = open_checkpoint(path)
    return {k: src[k] for k in src}


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a .pth/.ckpt, unwrapped to its flat ``{key: tensor}`` state dict."""
    return _unwrap_state_dict(load_torch_object(path), str(path))


def load_torch_object(path: str | Path, mmap: bool = True) -> Any:
    """The whole object of a torch file (a state dict, a Lightning checkpoint with its optimizer and loop state),
    read on the CPU with ``torch.load(weights_only=True)``: the one reader of ``.pth``/``.ckpt`` files, for
    ``init_from`` and for resuming alike.

    Refuses (:class:`UnsafeCheckpointError`) anything the restricted unpickler rejects: such a file is never
    unpickled with the full unpickler, whatever the caller or the environment (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)
    asks. A file cut short raises :class:`CorruptCheckpointError`. ``mmap`` maps the tensors' bytes instead of
    reading them (cheap for a look at a big checkpoint's metadata).
    """
    path = Path(path)
    try:
        try:
            return _torch_load(path, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return _torch_load(path, mmap=False)  # legacy (non-zip) torch.save format: cannot be mapped
    except (UnsafeCheckpointError, FileNotFoundError, PermissionError):
        raise
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        # torch reports a cut-short zip as EINVAL, a cut-short legacy pickle as EOF or a truncated pickle.
        raise _corrupt(path, err) from None
    except RuntimeError as err:
        if "zip" not in str(err).lower():
            raise
        raise _corrupt(path, err) from None


def _torch_load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise  # not a refusal: a damaged pickle (load_torch_object says so)
        raise UnsafeCheckpointError(
            f"{path}: holds Python code (objects other than tensors, numbers, strings and containers) and will not "
            "be loaded: reading it would run that code. If you made it yourself, convert it to safetensors (or a "
            "plain state dict) where you trust it; otherwise delete it. "
            f"torch said: {str(err).splitlines()[0]}"
        ) from None


def _unwrap_state_dict(obj: Any, label: str) -> dict[str, torch.Tensor]:
    """The flat state dict inside what torch.load returned (a state dict, or a Lightning/DeepSpeed/VAR dict)."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("%s: using the nested %r entry as the state dict", label, key)
                return dict(inner)
        # Keep tensors only if nothing nested matched (e.g. a dict with a few metadata numbers).
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            dropped = sorted(str(k) for k in obj if k not in tensors)
            log.warning("%s: ignoring non-tensor entries %s", label, dropped[:10])
            return tensors
    raise CheckpointFormatError(f"{label}: no state dict found (got {type(obj).__name__})")


def _open_safetensors(path: Path) -> Any:
    """``safe_open`` of one file; a file cut short or damaged raises :class:`CorruptCheckpointError` naming it
    (safetensors' own error names no file)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise _corrupt(path, err) from None


def _single_file_map(path: Path) -> dict[str, Path]:
    with _open_safetensors(path) as f:
        return dict.fromkeys(f.keys(), path)


def _open_index(index_path: Path) -> TensorSource:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointFormatError(f"{index_path}: not a checkpoint index ({err})") from None
    files = {k: index_path.parent / v for k, v in weight_map.items()}
    bad = sorted({p.name for p in files.values() if not p.name.lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)})
    if bad:
        raise CheckpointFormatError(f"{index_path}: unsupported shard files {bad}")
    if all(p.name.lower().endswith(SAFETENSORS_SUFFIXES) for p in files.values()):
        return SafetensorsSource(files, label=str(index_path.parent))
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(files.values()):
        tensors.update(load_torch_file(shard))
    return MemorySource({k: tensors[k] for k in files}, label=str(index_path.parent))


def _open_folder(folder: Path) -> TensorSource:
    for name in (SAFE_INDEX, SAFE_SINGLE, TORCH_INDEX, TORCH_SINGLE):
        if (folder / name).is_file():
            return open_checkpoint(folder / name)
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        weight_map: dict[str, Path] = {}
        for shard in shards:
            weight_map.update(_single_file_map(shard))
        return SafetensorsSource(weight_map, label=str(folder))
    raise CheckpointFormatError(
        f"{folder}: no weights found (expected {SAFE_INDEX}, {SAFE_SINGLE}, *.safetensors or {TORCH_SINGLE})"
    )


# ---------------------------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    """Bytes from ``5000000000`` or ``"5GB"`` / ``"500MB"`` / ``"2GiB"`` (transformers' spelling)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 1000**3, "MB": 1000**2, "KB": 1000, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_safetensors(
    source: TensorSource,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    keys: Iterable[str] | None = None,
) -> list[Path]:
    """Write ``source`` as HF does: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when over ``max_shard_size``. Floating tensors are cast to ``dtype`` when
    given (integer buffers never are); one shard is held in memory at a time. Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(source) if keys is None else list(keys)
    limit = parse_size(max_shard_size)

    def out_bytes(k: str) -> int:
        dt = _cast_dtype(source.dtype(k), dtype)
        return source.numel(k) * _itemsize(dt)

    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        b = out_bytes(k)
        if groups[-1] and size + b > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += b
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    n = len(groups)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups, strict=True):
        tensors = _unshared({k: _for_saving(source[k], dtype) for k in group})
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        del tensors
    if n > 1:
        index = {
            "metadata": {"total_size": sum(out_bytes(k) for k in keys)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [out_dir / name for name in names] + [out_dir / SAFE_INDEX]
    return [out_dir / names[0]]


def save_torch_state_dict(
    tensors: Mapping[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """``torch.save`` of a plain ``{key: tensor}`` dict (what VAR's ``.pth`` files are), loadable with
    ``weights_only=True``; each tensor is saved on its own storage (no hidden bigger buffer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_unshared({k: _for_saving(v, dtype) for k, v in tensors.items()}), path)
    return path


def _cast_dtype(src: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and src.is_floating_point else src


def _for_saving(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to(device="cpu", dtype=_cast_dtype(t.dtype, dtype))
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share memory with an earlier one (tied weights): safetensors refuses shared storage,
    and a tied pair must come back as two independent tensors anyway."""
    seen: set[int] = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            tensors[k] = t.clone()
        seen.add(ptr)
    return tensors


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def state_sha256(module: torch.nn.Module, fp32: bool = True) -> str:
    """sha256 over a module's state dict (names and bytes, in name order); ``fp32``: of the values cast to fp32,
    so that the same weights loaded in another dtype give the same digest."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu()
        if fp32 and tensor.is_floating_point():
            tensor = tensor.float()
        digest.update(key.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
