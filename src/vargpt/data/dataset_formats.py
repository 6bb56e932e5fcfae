"""The upstream dataset formats converted to shards by :mod:`vargpt.data.datasets_to_shards`.

:class:`AnnotationConverter` (JSON/JSONL annotations: LLaVA's ``{id, image?, conversations: [{from, value}]}`` and
VARGPT's sharegpt ``{messages: [{role, content}], images: [...]}``), :class:`PreferenceConverter` (LLaMA-Factory's
ranking sharegpt, VARGPT-v1.1's preference data: ``{conversations, chosen, rejected, images, system?}``) and
:class:`ParquetConverter`
(LLaVA-OneVision-Data parquet: ``id``, ``image {bytes, path}``, ``conversations``, ``data_source``), and the
command line of the annotation scripts (:func:`annotation_cli`).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vargpt.data.datasets_to_shards import (
    BadInputError,
    ConvertedSample,
    Converter,
    Part,
    add_output_args,
    chunk_parts,
    make_pair_sample,
    make_sample,
    options_from_args,
    read_image_file,
    run_cli,
)
from vargpt.data.records import (
    IMAGE_MISSING,
    MALFORMED_ENTRY,
    InvalidSampleError,
    as_text,
    check_record,
    normalize_messages,
    normalize_response,
)

TRUNCATED_ANNOTATIONS = "truncated_annotations"


# ------------------------------------------------------------------------------------------------ formats
def iter_json_entries(path: Path, chunk_chars: int = 1 << 16, max_entry_chars: int = 1 << 26) -> Iterator[Any]:
    """Entries of a JSON array file (streamed: one entry in memory at a time) or of a JSON-lines file.

    Invalid UTF-8 bytes are kept as surrogates, so the entry holding them is skipped as ``non_utf8`` rather
    than failing the file. An unparsable line, or a file cut off inside an entry (an interrupted download), is
    yielded as an ``InvalidSampleError`` for the driver to count; the entries before it convert.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        if head != "[":
            for n, line in enumerate(itertools.chain([head + f.readline()], f)):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    yield InvalidSampleError(MALFORMED_ENTRY, f"line {n + 1}: {exc}")
            return
        buf, pos, eof = f.read(chunk_chars), 0, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                entry, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof
            except json.JSONDecodeError as exc:
                if eof:
                    yield InvalidSampleError(TRUNCATED_ANNOTATIONS, f"{path}: cut off or unparsable at the end ({exc})")
                    return
                if len(buf) - pos > max_entry_chars:
                    raise ValueError(f"{path}: syntax error near {exc}") from None
                complete = False
            if complete:
                yield entry
                pos = end
                continue
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0


def check_annotation_file(path: Path) -> None:
    """Raise :class:`BadInputError` unless ``path`` is a JSON array or JSON-lines file whose first entry parses."""
    if not path.is_file():
        raise BadInputError(f"annotations {path}: no such file (pass the JSON or JSON-lines file with --annotations)")
    if path.stat().st_size == 0:
        raise BadInputError(f"annotations {path}: the file is empty (0 bytes); download it again")
    try:
        first = next(iter_json_entries(path), None)
    except ValueError as exc:
        first = InvalidSampleError(MALFORMED_ENTRY, str(exc))
    if first is None:
        raise BadInputError(f"annotations {path}: no entry (the file holds only whitespace or an empty array)")
    if isinstance(first, InvalidSampleError):
        raise BadInputError(
            f"annotations {path}: not a JSON array or JSON-lines file ({first.detail[:200]}); pass LLaVA's or "
            "VARGPT's annotation file"
        )


@dataclass
class AnnotationConverter(Converter):
    """LLaVA-1.5 JSON (``image`` + ``conversations``) and sharegpt JSON (``images`` + ``messages``) annotations."""

    annotations: Path
    image_root: Path
    source: str

    def check_input(self) -> None:
        check_annotation_file(Path(self.annotations))
        if not Path(self.image_root).is_dir():
            raise BadInputError(f"image root {self.image_root}: no such folder (--image-root)")

    def input_name(self) -> str:
        return f"annotations {self.annotations}"

    def fingerprint(self) -> dict[str, Any]:
        stat = Path(self.annotations).stat()
        return {
            "kind": "annotations",
            "annotations": str(Path(self.annotations).resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "image_root": str(Path(self.image_root).resolve()),
            "source": self.source,
        }

    def parts(self, part_size: int, limit: int | None) -> Iterator[Part]:
        return chunk_parts(iter_json_entries(Path(self.annotations)), part_size, limit)

    def to_sample(self, index: int, entry: Any) -> ConvertedSample:
        if isinstance(entry, InvalidSampleError):
            raise entry
        if not isinstance(entry, dict):
            raise InvalidSampleError(MALFORMED_ENTRY, f"entry is {type(entry).__name__}")
        messages = normalize_messages(entry.get("messages", entry.get("conversations")))
        names = entry.get("images", [entry["image"]] if entry.get("image") else [])
        if isinstance(names, str):
            names = [names]
        check_record(messages, len(names))
        images = [read_image_file(Path(self.image_root), as_text(n, "image path")) for n in names]
        return make_sample(self.entry_id(index, entry), messages, images, self.source)


@dataclass
class PreferenceConverter(AnnotationConverter):
    """LLaMA-Factory's ranking sharegpt annotations (``"ranking": true``): ``conversations`` (the prompt turns, ending
    on a human turn), ``chosen`` and ``rejected`` (one gpt message each), ``images`` (the prompt's, chosen's, then
    rejected's, in placeholder order) and an optional ``system`` text. One pair = one sample (``records.check_pair``);
    either spelling of the turns is accepted."""

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "kind": "preference"}

    def manifest_extra(self) -> dict[str, Any]:
        return {"pairs": True}

    def to_sample(self, index: int, entry: Any) -> ConvertedSample:
        if isinstance(entry, InvalidSampleError):
            raise entry
        if not isinstance(entry, dict):
            raise InvalidSampleError(MALFORMED_ENTRY, f"entry is {type(entry).__name__}")
        messages = normalize_messages(entry.get("conversations", entry.get("messages")))
        if entry.get("system"):
            messages = [{"role": "system", "content": as_text(entry["system"], "system")}, *messages]
        chosen, rejected = (normalize_response(entry.get(side), side) for side in ("chosen", "rejected"))
        names = entry.get("images") or []
        if isinstance(names, str):
            names = [names]
        images = [read_image_file(Path(self.image_root), as_text(n, "image path")) for n in names]
        return make_pair_sample(self.entry_id(index, entry), messages, chosen, rejected, images, self.source)


@dataclass
class ParquetConverter(Converter):
    """LLaVA-OneVision-Data parquet files: one row = ``id``, ``image {bytes, path}``, ``conversations``,
    ``data_source``. Parts are runs of row groups, read inside the workers."""

    files: list[str]
    source: str
    # Where ``image.path`` points when a row carries no image bytes (null = such rows are image_missing).
    image_root: Path | None = None
    columns: tuple[str, ...] = ("id", "image", "conversations", "data_source")

    def check_input(self) -> None:
        if not self.files:
            raise BadInputError("no parquet file given (--parquet)")
        for path in self.files:
            if not Path(path).is_file():
                raise BadInputError(f"parquet {path}: no such file")
            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except (pa.ArrowException, OSError) as exc:
                raise BadInputError(f"parquet {path}: not a readable parquet file ({exc})") from None
            if "conversations" not in names:
                raise BadInputError(f"parquet {path}: no 'conversations' column (columns {names}): not OneVision data")

    def input_name(self) -> str:
        more = f" and {len(self.files) - 1} more" if len(self.files) > 1 else ""
        return f"parquet {self.files[0]}{more}"

    def fingerprint(self) -> dict[str, Any]:
        stats = [(str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in self.files]
        return {"kind": "parquet", "files": stats, "source": self.source, "image_root": str(self.image_root)}

    def parts(self, part_size: int, limit: int | None) -> Iterator[Part]:
        first, index = 0, 0
        for path in self.files:
            metadata = pq.ParquetFile(path).metadata
            groups: list[int] = []
            rows = 0
            for g in range(metadata.num_row_groups):
                groups.append(g)
                rows += metadata.row_group(g).num_rows
                last = g == metadata.num_row_groups - 1
                if rows >= part_size or last:
                    count = rows if limit is None else max(0, min(rows, limit - first))
                    if count == 0:
                        return
                    yield Part(index, first, count, (path, groups))
                    index, first, groups, rows = index + 1, first + rows, [], 0

    def entries(self, part: Part) -> Iterator[tuple[int, Any]]:
        path, groups = part.payload
        parquet = pq.ParquetFile(path)
        columns = [c for c in self.columns if c in parquet.schema_arrow.names]
        rows = parquet.read_row_groups(groups, columns=columns).to_pylist()
        return enumerate(rows[: part.count], part.first)

    def to_sample(self, index: int, row: Any) -> ConvertedSample:
        messages = normalize_messages(row.get("conversations"))
        image = row.get("image") or {}
        images = []
        if image.get("bytes"):
            images.append(image["bytes"])
        elif image.get("path"):
            if self.image_root is None:
                raise InvalidSampleError(IMAGE_MISSING, f"no bytes for {image['path']} and no image root")
            images.append(read_image_file(Path(self.image_root), as_text(image["path"], "image path")))
        meta = {"data_source": as_text(row.get("data_source") or "", "data_source")}
        return make_sample(self.entry_id(index, row), messages, images, self.source, meta)


def annotation_cli(
    argv: list[str] | None, description: str, converter: type[AnnotationConverter] = AnnotationConverter
) -> int:
    """The command line of the JSON annotation converters (LLaVA, sharegpt and ranking files use the same reader)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="JSON array or JSON-lines file")
    parser.add_argument("--image-root", type=Path, required=True, help="folder the image paths are relative to")
    parser.add_argument("--source", default=None, help="source name (default: the annotation file's stem)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    source = args.source or args.annotations.stem
    return run_cli(converter(args.annotations, args.image_root, source), options_from_args(args))
