"""ImageNet as VARGPT's ImageNet-Instruct files name it: ``image_{file_idx}_{idx}.jpg`` from the HF parquet files.

VARGPT's README numbers the files of ``ILSVRC/imagenet-1k``'s ``train-*.parquet`` in the order ``glob.glob``
lists them (``file_idx``) and the rows within a file (``idx``). ``glob`` returns the directory's listing order,
which is not sorted and depends on the file system; ``order="sorted"`` (the default) uses sorted names, and
``order="listing"`` reproduces the README on the machine where the listing matches. The index records the
original ImageNet file name, its ``n0xxxxxxx_nnnn`` prefix (the README's ``image_mapping`` key) and the label,
so a mismatch can be checked against the labels the instruction files imply.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ORDERS = ("sorted", "listing")


def imagenet_files(parquet_dir: str | Path, order: str = "sorted") -> list[Path]:
    """The ``train-*.parquet`` files of a folder in ``file_idx`` order."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    names = [n for n in os.listdir(parquet_dir) if n.startswith("train-") and n.endswith(".parquet")]
    if order == "sorted":
        names.sort()
    if not names:
        raise FileNotFoundError(f"no train-*.parquet in {parquet_dir}")
    return [Path(parquet_dir) / n for n in names]


def index_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    """One row per image: the VARGPT name, where its bytes are, its original name, prefix and label."""
    for file_idx, path in enumerate(files):
        parquet = pq.ParquetFile(path)
        columns = ["image.path"] + (["label"] if "label" in parquet.schema_arrow.names else [])
        for idx, row in enumerate(parquet.read(columns=columns).to_pylist()):
            original = row["image"]["path"] or ""
            yield {
                "name": f"image_{file_idx}_{idx}.jpg",
                "parquet_file": path.name,
                "row": idx,
                "original_path": original,
                "prefix": "_".join(original.split("_")[:2]),
                "label": row.get("label"),
            }


def write_index(files: list[Path], out: str | Path) -> int:
    """Write the index as a parquet file; returns the number of images."""
    rows = list(index_rows(files))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows)


def extract_file(path: Path, file_idx: int, out_dir: Path) -> int:
    """Write the images of one parquet file as ``image_{file_idx}_{idx}.jpg`` (original bytes); skips files
    already written with the right size, so an interrupted extraction resumes. Returns images written."""
    written = 0
    parquet = pq.ParquetFile(path)
    idx = 0
    for batch in parquet.iter_batches(batch_size=256, columns=["image"]):
        for image in batch.column("image").to_pylist():
            target = out_dir / f"image_{file_idx}_{idx}.jpg"
            idx += 1
            data = image["bytes"]
            if target.is_file() and target.stat().st_size == len(data):
                continue
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            written += 1
    return written


def extract_images(files: list[Path], out_dir: str | Path, num_workers: int = 1) -> int:
    """Extract every image under its VARGPT name, one process per parquet file; returns images written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_workers <= 1:
        return sum(extract_file(path, i, out_dir) for i, path in enumerate(files))
    with ProcessPoolExecutor(num_workers) as pool:
        futures = [pool.submit(extract_file, path, i, out_dir) for i, path in enumerate(files)]
        return sum(f.result() for f in futures)
