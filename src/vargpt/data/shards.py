"""The shard format on disk: writing size-bounded tar shards, the manifest, reading samples back, verification.

A source folder holds ``manifest.json`` and WebDataset tar shards. One sample is the members
``{key}.json`` (the record: ``id``, ``messages``, ``images``, ``source``, ``meta``; a preference pair adds ``chosen``,
``rejected`` and optionally ``ref_logps``, see ``records.check_pair``) and ``{key}.{name}`` for every
image name the record lists (``img0.jpg``, ``img1.png``, ...), stored as the original encoded bytes. Shards are
written to a temporary name and renamed when complete, with fixed tar metadata so that the same input gives
byte-identical shards (and the same sha256) on every run.

Precomputed VQ codes (data_prep/encode_gen_codes.py): the record's ``gen_codes`` maps a generation image's name
to the member holding its codes (``img1.png`` -> ``img1.codes.npy``: the per-scale codes concatenated, (L,) int16
in ``.npy`` format); the image member itself may then be left out. The manifest's ``gen_codes`` block says which
VQ-VAE (schedule, vocabulary, weights' sha256) the codes are of.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vargpt.data.records import (
    IMAGE_GEN,
    IMAGE_MISSING,
    MALFORMED_ENTRY,
    NOT_A_PAIR,
    PAIR_SIDES,
    UNEXPECTED_PAIR,
    InvalidSampleError,
    PairLayout,
    as_text,
    check_pair,
    check_record,
    is_pair,
    normalize_messages,
    normalize_response,
    placeholder_kinds,
)

FORMAT = "vargpt-shards-v1"
MANIFEST_NAME = "manifest.json"
# Record field (image name -> codes member) and manifest block of precomputed VQ codes.
GEN_CODES = "gen_codes"
_TAR_BLOCK = 512


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    """One shard's line in the manifest."""

    name: str
    num_samples: int
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_members(
    record: dict[str, Any], images: list[bytes | None], extra: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    """Tar members of one sample: its JSON record, the bytes of every image it names, in order (an image given as
    None is not stored: its precomputed codes stand in for it), then ``extra`` members (codes)."""
    if len(images) != len(record["images"]):
        raise ValueError(f"record names {len(record['images'])} images, got {len(images)}")
    members = {"json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
    members.update((name, data) for name, data in zip(record["images"], images, strict=True) if data is not None)
    members.update(extra or {})
    return members


def codes_member(image_name: str) -> str:
    """The member that holds an image's precomputed codes: ``img1.png`` -> ``img1.codes.npy``."""
    return f"{image_name.split('.', 1)[0]}.codes.npy"


def encode_codes(codes_L: np.ndarray) -> bytes:
    """One image's codes (L,) as ``.npy`` bytes, int16 when the vocabulary allows (VAR's 4096 does)."""
    buf = io.BytesIO()
    np.save(buf, codes_L.astype(np.int16 if codes_L.max(initial=0) < 2**15 else np.int32), allow_pickle=False)
    return buf.getvalue()


def decode_codes(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> the codes (L,) as stored (int16 or int32)."""
    codes = np.load(io.BytesIO(data), allow_pickle=False)
    if codes.ndim != 1 or codes.dtype.kind != "i":
        raise ValueError(f"codes must be a 1-D integer array, got {codes.dtype} {codes.shape}")
    return codes


@dataclass
class ShardWriter:
    """Writes samples to ``{prefix}-{j:03d}.tar`` shards of at most ``max_bytes`` and ``max_samples`` (0 = any)."""

    out_dir: Path
    prefix: str
    max_bytes: int
    max_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list, init=False)
    _tar: tarfile.TarFile | None = field(default=None, init=False, repr=False)
    _path: Path | None = field(default=None, init=False, repr=False)
    _count: int = field(default=0, init=False, repr=False)
    _size: int = field(default=0, init=False, repr=False)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits names there)")
        size = sum(_TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK for data in members.values())
        full = self._count and (
            self._size + size > self.max_bytes or (self.max_samples and self._count >= self.max_samples)
        )
        if self._tar is None or full:
            self._roll()
        assert self._tar is not None
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._size += size

    def _roll(self) -> None:
        self._finish()
        name = f"{self.prefix}-{len(self.shards):03d}.tar"
        self._path = self.out_dir / name
        # Open across write() calls, closed by _finish(): a context manager cannot span them.
        self._tar = tarfile.open(self._path.with_name(name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = self._size = 0

    def _finish(self) -> None:
        if self._tar is None or self._path is None:
            return
        self._tar.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self.shards.append(ShardInfo(self._path.name, self._count, sha256_file(self._path), self._path.stat().st_size))
        self._tar = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; returns every shard written."""
        self._finish()
        return self.shards


def read_manifest(source_dir: str | Path) -> dict[str, Any]:
    path = Path(source_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {source_dir}: convert the data first (data_prep/*.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_list(source_dir: str | Path) -> list[tuple[str, int]]:
    """``(path, num_samples)`` of every shard of a source, in manifest order."""
    manifest = read_manifest(source_dir)
    return [(str(Path(source_dir) / s["name"]), int(s["num_samples"])) for s in manifest["shards"]]


def iter_raw_samples(
    paths: Iterator[str] | list[str], handler: Callable[[Exception], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, ``json`` and image member bytes) of the given shards, in order.

    ``handler`` decides on read errors as in WebDataset (return True to continue); the default re-raises.
    """
    import webdataset as wds  # only to read shards: the writers and the GPU image (no webdataset) import this module

    handler = handler or wds.reraise_exception
    return wds.tariterators.tarfile_samples(({"url": p} for p in paths), handler=handler)


def _load_record(raw: dict[str, Any], pair: bool) -> dict[str, Any]:
    """The JSON record of a raw sample with its turns normalised (a pair's responses too when ``pair``)."""
    try:
        # Decoded first, so bad UTF-8 is non_utf8 here as in the converters (json.loads would call it malformed).
        record = json.loads(as_text(raw["json"], f"{raw.get('__key__')}: record"))
        if not isinstance(record["images"], list):
            raise TypeError(f"images is {type(record['images']).__name__}, not a list")
        if is_pair(record) and not pair:
            raise InvalidSampleError(UNEXPECTED_PAIR, f"{raw.get('__key__')}: a preference pair (data.pairs=true)")
        if pair and not is_pair(record):
            raise InvalidSampleError(NOT_A_PAIR, f"{raw.get('__key__')}: a conversation, not a preference pair")
        record["messages"] = normalize_messages(record["messages"])
        for side in PAIR_SIDES if pair else ():
            record[side] = normalize_response(record.get(side), side)
        if not isinstance(record.get(GEN_CODES, {}), dict):
            raise TypeError(f"{GEN_CODES} is {type(record[GEN_CODES]).__name__}, not a mapping")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InvalidSampleError):
            raise
        raise InvalidSampleError(MALFORMED_ENTRY, f"{raw.get('__key__')}: bad record ({exc})") from None
    return record


def _image_members(raw: dict[str, Any], record: dict[str, Any], codes_ok: bool) -> list[Any]:
    """The bytes of the record's images in placeholder order (None: only its codes are stored, when ``codes_ok``)."""
    codes = record.get(GEN_CODES, {})
    missing = [n for n in record["images"] if n not in raw and not (codes_ok and codes.get(n) in raw)]
    if missing:
        raise InvalidSampleError(IMAGE_MISSING, f"{raw.get('__key__')}: no member {missing}")
    return [raw.get(n) for n in record["images"]]


def parse_record(raw: dict[str, Any], codes_ok: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """The record of a raw sample (messages normalised and checked) and its images' bytes in placeholder order.

    ``codes_ok``: an image whose member is absent but whose precomputed codes are present is None, not missing.
    A preference pair is ``unexpected_pair`` here (:func:`parse_pair_record` reads it).
    """
    record = _load_record(raw, pair=False)
    check_record(record["messages"], len(record["images"]))
    return record, _image_members(raw, record, codes_ok)


def parse_pair_record(raw: dict[str, Any], codes_ok: bool = False) -> tuple[dict[str, Any], list[Any], PairLayout]:
    """A preference pair's record (prompt and responses normalised and checked), its images' bytes in placeholder
    order (as :func:`parse_record`) and how they split; a record that is not a pair is ``not_a_pair``."""
    record = _load_record(raw, pair=True)
    images = _image_members(raw, record, codes_ok)
    codes = record.get(GEN_CODES, {})
    # What identifies each image for the identical-pair check: its bytes, or its codes' when the pixels were dropped.
    identity = [data if data is not None else raw[codes[n]] for n, data in zip(record["images"], images, strict=True)]
    layout = check_pair(record["messages"], record["chosen"], record["rejected"], identity)
    return record, images, layout


def parse_sample(raw: dict[str, Any], codes_ok: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """Record and images' bytes of a conversation (:func:`parse_record`) or a pair (:func:`parse_pair_record`)."""
    try:
        pair = is_pair(json.loads(raw["json"]))
    except (KeyError, TypeError, ValueError):
        pair = False  # parse_record says what is wrong with it
    return parse_pair_record(raw, codes_ok)[:2] if pair else parse_record(raw, codes_ok)


def gen_image_names(record: dict[str, Any]) -> list[str]:
    """The names of a parsed record's generation targets (``<image_gen>`` images), conversation or pair."""
    if not is_pair(record):
        kinds = placeholder_kinds(record["messages"])
        return [name for name, kind in zip(record["images"], kinds, strict=True) if kind == IMAGE_GEN]
    # A pair's prompt holds no generation target (records.check_pair): its responses' images are the targets.
    return record["images"][len(placeholder_kinds(record["messages"], open_end=True)) :]


@dataclass
class VerifyReport:
    """What :func:`verify_source` found; ``ok`` when there are no problems."""

    num_shards: int = 0
    num_samples: int = 0
    num_images: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_source(source_dir: str | Path, decode_images: bool = True, max_problems: int = 50) -> VerifyReport:
    """Re-read every shard: checksums and counts against the manifest, every record valid, every image decodes."""
    source_dir = Path(source_dir)
    report = VerifyReport()

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    manifest = read_manifest(source_dir)
    num_tokens = manifest.get(GEN_CODES, {}).get("num_tokens")
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in source_dir.glob("*.tar") if p.name not in listed):
        problem(f"{extra}: shard not in the manifest")
    keys: set[str] = set()
    for shard in manifest["shards"]:
        path = source_dir / shard["name"]
        report.num_shards += 1
        if not path.is_file():
            problem(f"{shard['name']}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problem(f"{shard['name']}: sha256 differs from the manifest")
        count = 0
        try:
            for raw in iter_raw_samples([str(path)]):
                count += 1
                if raw["__key__"] in keys:
                    problem(f"{shard['name']}: duplicate key {raw['__key__']}")
                keys.add(raw["__key__"])
                try:
                    record, images = parse_sample(raw, codes_ok=True)
                    for data in images if decode_images else []:
                        if data is not None:
                            with Image.open(io.BytesIO(data)) as img:
                                img.load()
                    for member in record.get(GEN_CODES, {}).values():
                        codes = decode_codes(raw[member])
                        if num_tokens is not None and len(codes) != num_tokens:
                            raise ValueError(f"{member}: {len(codes)} codes, the manifest says {num_tokens}")
                    report.num_images += len(images)
                except (InvalidSampleError, KeyError, OSError, SyntaxError, ValueError) as exc:
                    problem(f"{shard['name']}: sample {raw['__key__']}: {exc}")
        except (tarfile.TarError, OSError, ValueError) as exc:
            problem(f"{shard['name']}: unreadable tar ({exc})")
        if count != shard["num_samples"]:
            problem(f"{shard['name']}: {count} samples, manifest says {shard['num_samples']}")
        report.num_samples += count
    if report.num_samples != manifest["num_samples"]:
        problem(f"{report.num_samples} samples in the shards, manifest says {manifest['num_samples']}")
    return report
