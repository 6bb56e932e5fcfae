"""Conversion of upstream datasets to shards: the parallel, resumable, idempotent driver and its command line.

A converter turns its input into numbered *parts* (a few thousand entries each, cheap to describe) in the
main process; worker processes turn every entry of a part into a sample or a counted skip, and write the
part's shards plus a ``parts/part-NNNNN.json`` record. A part with a record is done: re-running skips it
(resume), and a finished conversion with the same input and options returns its manifest untouched
(idempotent). Images are read only inside the workers, one entry at a time (a 665K-entry JSON is streamed,
never held with its images in memory). Bad input is skipped, counted by reason and the first few ids listed.
Input that cannot give a source at all (a missing, empty or non-JSON annotation file, a file that is not parquet)
is refused before any work, and a conversion that ends with no sample fails and leaves nothing behind: both raise
:class:`BadInputError`, which the scripts print as one line (exit status 1).

The formats (JSON annotations, OneVision parquet) are in :mod:`vargpt.data.dataset_formats`; the shapes world and
the generation codes use the same driver (``vargpt.data.shapes``, ``vargpt.inference.gen_codes``).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vargpt.data.records import (
    IMAGE_MISSING,
    IMAGE_TRUNCATED,
    IMAGE_UNREADABLE,
    InvalidSampleError,
    check_pair,
    check_record,
)
from vargpt.data.shards import (
    FORMAT,
    MANIFEST_NAME,
    ShardWriter,
    iter_raw_samples,
    read_manifest,
    sample_members,
    shard_list,
    write_json_atomic,
)

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
STATE_NAME = "_convert.json"
# Image formats stored as their original bytes; anything else (GIF, BMP, TIFF, ...) is re-encoded as PNG.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


class BadInputError(ValueError):
    """The input cannot give a source (missing, empty, not in the format, or no sample converts); the message
    names the file and what is wrong."""


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class ConvertedSample:
    """A sample ready for the shard: its record, the encoded bytes of its images in placeholder order (None: not
    stored, see ``shards.sample_members``) and any further members (precomputed codes)."""

    record: dict[str, Any]
    images: list[bytes | None]
    extra: dict[str, bytes] = field(default_factory=dict)


def check_image(data: bytes) -> tuple[bytes, str]:
    """Fully decode image bytes (catching truncation); returns the bytes to store and their extension."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format in _KEPT_FORMATS:
                return data, _KEPT_FORMATS[img.format]
            out = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, "PNG")
            return out.getvalue(), "png"
    except UnidentifiedImageError as exc:
        raise InvalidSampleError(IMAGE_UNREADABLE, str(exc)) from None
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = IMAGE_TRUNCATED if "truncated" in str(exc).lower() else IMAGE_UNREADABLE
        raise InvalidSampleError(reason, str(exc)) from None


def read_image_file(root: Path, name: str) -> bytes:
    """Bytes of ``root/name``, falling back to ``root/basename(name)`` for annotation paths with a folder prefix."""
    for path in (root / name, root / Path(name).name):
        if path.is_file():
            return path.read_bytes()
    raise InvalidSampleError(IMAGE_MISSING, str(root / name))


def make_sample(
    sample_id: str,
    messages: list[dict[str, str]],
    images: list[bytes],
    source: str,
    meta: dict[str, Any] | None = None,
) -> ConvertedSample:
    """Validate a conversation against its images and build the shard record (images named ``img{i}.{ext}``)."""
    check_record(messages, len(images))
    return _with_images({"id": sample_id, "messages": messages}, images, source, meta)


def make_pair_sample(
    sample_id: str,
    messages: list[dict[str, str]],
    chosen: dict[str, str],
    rejected: dict[str, str],
    images: list[bytes],
    source: str,
    meta: dict[str, Any] | None = None,
) -> ConvertedSample:
    """Validate a preference pair (``records.check_pair``: the prompt's images, then chosen's, then rejected's; the
    images compared by their bytes) and build its shard record, one sample for the pair."""
    check_pair(messages, chosen, rejected, images)
    return _with_images(
        {"id": sample_id, "messages": messages, "chosen": chosen, "rejected": rejected}, images, source, meta
    )


def _with_images(
    record: dict[str, Any], images: list[bytes], source: str, meta: dict[str, Any] | None
) -> ConvertedSample:
    """The sample of a checked record: its images decoded whole and named ``img{i}.{ext}``, its source and meta."""
    checked = [check_image(data) for data in images]
    record = {
        **record,
        "images": [f"img{i}.{ext}" for i, (_, ext) in enumerate(checked)],
        "source": source,
        "meta": meta or {},
    }
    return ConvertedSample(record, [data for data, _ in checked])


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Part:
    """A unit of work: ``count`` entries from global entry index ``first``; ``payload`` says how to get them."""

    index: int
    first: int
    count: int
    payload: Any


class Converter:
    """A source format: describes parts (main process) and converts their entries (worker processes).

    Subclasses are dataclasses of plain values, so they pickle into spawned workers.
    """

    source: str

    def check_input(self) -> None:
        """Raise :class:`BadInputError` when the input cannot give a source (called before any work)."""

    def input_name(self) -> str:
        """The input, as messages name it."""
        return self.source

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the input (paths, sizes, mtimes, settings): a change requires ``overwrite``."""
        raise NotImplementedError

    def parts(self, part_size: int, limit: int | None) -> Iterator[Part]:
        raise NotImplementedError

    def entries(self, part: Part) -> Iterator[tuple[int, Any]]:
        """``(global index, entry)`` of a part; the default reads entries carried in the payload."""
        return enumerate(part.payload, part.first)

    def sample_key(self, index: int, entry: Any) -> str:
        """The shard key of a converted entry (unique in the source): its global index by default."""
        return f"{index:09d}"

    def manifest_extra(self) -> dict[str, Any]:
        """Entries the manifest carries besides the counts and the fingerprint (none by default)."""
        return {}

    def entry_id(self, index: int, entry: Any) -> str:
        """The id listed for a skipped entry."""
        if isinstance(entry, dict) and entry.get("id") is not None:
            return str(entry["id"])
        return f"#{index}"

    def to_sample(self, index: int, entry: Any) -> ConvertedSample:
        raise NotImplementedError


@dataclass
class SourceRewriter(Converter):
    """An existing shard source re-written sample by sample (precomputed codes, reference log-probs): one part per
    input shard, read in order in chunks of ``batch_size`` raw samples (subclasses declare it), each chunk turned
    into entries ``(raw sample, what was computed)`` or InvalidSampleErrors by :meth:`process_chunk` (one model
    call per chunk)."""

    input_dir: Path

    def __post_init__(self) -> None:
        self.source = read_manifest(self.input_dir)["source"]

    def input_fingerprint(self) -> dict[str, Any]:
        """The input source's folder and its shards' names and sha256 (part of :meth:`fingerprint`)."""
        shards = [(s["name"], s["sha256"]) for s in read_manifest(self.input_dir)["shards"]]
        return {"input": str(Path(self.input_dir).resolve()), "shards": shards}

    def parts(self, part_size: int, limit: int | None) -> Iterator[Part]:
        """One part per input shard (``part_size`` does not apply), up to ``limit`` samples in all."""
        first = 0
        for index, (path, count) in enumerate(shard_list(self.input_dir)):
            count = count if limit is None else min(count, limit - first)
            if count <= 0:
                return
            yield Part(index, first, count, path)
            first += count

    def entries(self, part: Part) -> Iterator[tuple[int, Any]]:
        raws = itertools.islice(iter_raw_samples([part.payload]), part.count)
        index = part.first
        while chunk := list(itertools.islice(raws, self.batch_size)):
            yield from enumerate(self.process_chunk(chunk), index)
            index += len(chunk)

    def process_chunk(self, samples: list[dict[str, Any]]) -> list[Any]:
        """One entry per raw sample, in order: ``(raw, computed)`` or the sample's InvalidSampleError."""
        raise NotImplementedError

    def sample_key(self, index: int, entry: Any) -> str:
        return entry[0]["__key__"]

    def entry_id(self, index: int, entry: Any) -> str:
        return entry[0]["__key__"] if isinstance(entry, tuple) else f"#{index}"


def chunk_parts(entries: Iterable[Any], part_size: int, limit: int | None) -> Iterator[Part]:
    """Parts whose payload is the entries themselves (formats parsed in the main process)."""
    chunk: list[Any] = []
    first = 0
    for index, entry in enumerate(entries):
        if limit is not None and index >= limit:
            break
        chunk.append(entry)
        if len(chunk) == part_size:
            yield Part(first // part_size, first, len(chunk), chunk)
            first, chunk = index + 1, []
    if chunk:
        yield Part(first // part_size, first, len(chunk), chunk)


@dataclass
class ConvertOptions:
    """Where and how to write: shard size bounds, parallelism, what to do with an existing output."""

    out_dir: Path
    shard_max_bytes: int = 500 * 2**20
    shard_max_samples: int = 0
    part_size: int = 2000
    num_workers: int = 1
    overwrite: bool = False
    limit: int | None = None
    max_examples: int = 20

    def fingerprint(self) -> dict[str, Any]:
        """Options that change the output (not where it goes or how many processes write it)."""
        keys = ("shard_max_bytes", "shard_max_samples", "part_size", "limit")
        return {k: getattr(self, k) for k in keys}


@dataclass
class _PartResult:
    part: int
    num_entries: int
    num_samples: int
    num_images: int
    skipped_by_reason: dict[str, int]
    skipped_examples: list[dict[str, str]]
    shards: list[dict[str, Any]] = field(default_factory=list)


def convert_part(converter: Converter, part: Part, options: ConvertOptions) -> dict[str, Any]:
    """Convert one part (runs in a worker): write its shards, then its record in ``parts/``."""
    out_dir = Path(options.out_dir)
    writer = ShardWriter(out_dir, f"shard-{part.index:05d}", options.shard_max_bytes, options.shard_max_samples)
    result = _PartResult(part.index, 0, 0, 0, {}, [])
    skipped: Counter[str] = Counter()
    for index, entry in converter.entries(part):
        result.num_entries += 1
        try:
            sample = converter.to_sample(index, entry)
        except InvalidSampleError as exc:
            skipped[exc.reason] += 1
            if len(result.skipped_examples) < options.max_examples:
                example = {"id": converter.entry_id(index, entry), "reason": exc.reason, "detail": exc.detail[:200]}
                result.skipped_examples.append(example)
            continue
        writer.write(converter.sample_key(index, entry), sample_members(sample.record, sample.images, sample.extra))
        result.num_samples += 1
        result.num_images += len(sample.images)
    result.shards = [s.to_dict() for s in writer.close()]
    result.skipped_by_reason = dict(skipped)
    record = asdict(result)
    write_json_atomic(out_dir / PARTS_DIR / f"part-{part.index:05d}.json", record)
    return record


def _done_parts(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Records of finished parts whose shards are all present."""
    done = {}
    for path in sorted((out_dir / PARTS_DIR).glob("part-*.json")):
        record = json.loads(path.read_text())
        if all((out_dir / s["name"]).is_file() for s in record["shards"]):
            done[record["part"]] = record
    return done


def _clear_outputs(out_dir: Path) -> None:
    """Remove what a conversion writes (and nothing else that may live in the folder)."""
    for pattern in ("shard-*.tar", "shard-*.tar.tmp", f"{PARTS_DIR}/part-*.json", MANIFEST_NAME, STATE_NAME):
        for path in out_dir.glob(pattern):
            path.unlink()


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _prepare_output(converter: Converter, options: ConvertOptions) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Check an existing output against this conversion; returns (fingerprint, finished manifest or None)."""
    out_dir = Path(options.out_dir)
    fingerprint = _normalised({"converter": converter.fingerprint(), "options": options.fingerprint()})
    manifest_path, state_path = out_dir / MANIFEST_NAME, out_dir / STATE_NAME
    previous = None
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text()).get("fingerprint")
    elif state_path.is_file():
        previous = json.loads(state_path.read_text())
    if options.overwrite:
        _clear_outputs(out_dir)
    elif previous is not None and previous != fingerprint:
        raise FileExistsError(
            f"{out_dir} holds a conversion of other input or options; pass overwrite (--overwrite) to replace it"
        )
    elif manifest_path.is_file():
        return fingerprint, json.loads(manifest_path.read_text())
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path, fingerprint)
    return fingerprint, None


def _run_parts(
    converter: Converter, options: ConvertOptions, skip: set[int], executor: Executor | None
) -> Iterator[dict[str, Any]]:
    """Convert every part not in ``skip``, in-process or on a pool, with at most 2 parts per worker in flight."""
    parts = (p for p in converter.parts(options.part_size, options.limit) if p.index not in skip)
    if executor is None and options.num_workers <= 1:
        yield from (convert_part(converter, part, options) for part in parts)
        return
    pool = executor or ProcessPoolExecutor(options.num_workers)
    try:
        pending: set[Any] = set()
        for part in parts:
            pending.add(pool.submit(convert_part, converter, part, options))
            if len(pending) >= 2 * max(options.num_workers, 1):
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
        for future in pending:
            yield future.result()
    finally:
        if executor is None:
            pool.shutdown(cancel_futures=True)


def run_conversion(converter: Converter, options: ConvertOptions, executor: Executor | None = None) -> dict:
    """Convert ``converter``'s input to shards in ``options.out_dir`` and return the manifest.

    Resumes an interrupted run of the same conversion; returns an up-to-date manifest without work. A shared
    ``executor`` (a process pool) may be passed when converting many sources in a row.
    """
    converter.check_input()
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint, finished = _prepare_output(converter, options)
    if finished is not None:
        log.info("%s is up to date (%d samples); nothing to do", out_dir, finished["num_samples"])
        return finished
    done = _done_parts(out_dir)
    if done:
        log.info("%s: resuming, %d parts already converted", out_dir, len(done))
    start, converted = time.perf_counter(), 0
    for record in _run_parts(converter, options, set(done), executor):
        done[record["part"]] = record
        converted += record["num_entries"]
        rate = converted / max(time.perf_counter() - start, 1e-9)
        log.info(
            "%s part %d: %d samples, %d skipped (%.0f entries/s)",
            converter.source,
            record["part"],
            record["num_samples"],
            sum(record["skipped_by_reason"].values()),
            rate,
        )
    manifest = _merge_parts(converter.source, [done[p] for p in sorted(done)], fingerprint, options.max_examples)
    if manifest["num_samples"] == 0:
        # An empty source would only fail later, in training ("no source with a positive weight"): fail here,
        # and leave nothing, so that a corrected rerun starts afresh.
        _clear_outputs(out_dir)
        examples = "; ".join(f"{e['id']}: {e['reason']} {e['detail'][:80]}" for e in manifest["skipped_examples"][:3])
        raise BadInputError(
            f"{converter.input_name()}: no sample converted from {manifest['num_entries']} entries (skipped "
            f"{manifest['skipped_by_reason']}; e.g. {examples or 'none'}): the reasons say what is wrong (a wrong "
            "--image-root gives image_missing)"
        )
    manifest.update(converter.manifest_extra())
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    return manifest


def _merge_parts(
    source: str, records: list[dict[str, Any]], fingerprint: dict[str, Any], max_examples: int
) -> dict[str, Any]:
    skipped: Counter[str] = Counter()
    for record in records:
        skipped.update(record["skipped_by_reason"])
    return {
        "format": FORMAT,
        "source": source,
        "num_samples": sum(r["num_samples"] for r in records),
        "num_images": sum(r["num_images"] for r in records),
        "num_entries": sum(r["num_entries"] for r in records),
        "num_skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "skipped_examples": [e for r in records for e in r["skipped_examples"]][:max_examples],
        "shards": [s for r in records for s in r["shards"]],
        "fingerprint": fingerprint,
    }


# ------------------------------------------------------------------------------------------------ CLI helpers
def add_output_args(parser: argparse.ArgumentParser) -> None:
    """The output options every conversion script shares."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (shards + manifest.json)")
    parser.add_argument("--shard-size-mb", type=float, default=500, help="largest shard, MiB (default 500)")
    parser.add_argument("--shard-max-samples", type=int, default=0, help="most samples per shard (0 = any)")
    parser.add_argument("--part-size", type=int, default=2000, help="entries per unit of parallel work")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1: in-process)")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N entries (a trial)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output of other input/options")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        out_dir=args.out,
        shard_max_bytes=int(args.shard_size_mb * 2**20),
        shard_max_samples=args.shard_max_samples,
        part_size=args.part_size,
        num_workers=args.workers,
        overwrite=args.overwrite,
        limit=args.limit,
    )


def run_cli(converter: Converter, options: ConvertOptions) -> int:
    """Run a conversion from a script and print its summary; the exit status is 0, or 1 with a one-line error
    when the input cannot give a source or the output folder holds another conversion."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        manifest = run_conversion(converter, options)
    except (BadInputError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(summary(manifest, seconds))
    return 0


def summary(manifest: dict[str, Any], seconds: float | None = None) -> str:
    """Human-readable summary of a manifest: counts, skips by reason with the first ids, shards."""
    lines = [
        f"source {manifest['source']}: {manifest['num_samples']} samples, {manifest['num_images']} images, "
        f"{len(manifest['shards'])} shards, {manifest['num_skipped']} skipped"
    ]
    lines += [f"  skipped {reason}: {n}" for reason, n in manifest["skipped_by_reason"].items()]
    lines += [f"    e.g. {e['id']}: {e['reason']} {e['detail']}" for e in manifest["skipped_examples"][:5]]
    if seconds:
        lines.append(f"  {manifest['num_entries'] / seconds:.1f} entries/s over {seconds:.1f} s")
    return "\n".join(lines)
