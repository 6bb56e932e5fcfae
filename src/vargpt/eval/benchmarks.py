"""The benchmark registry: each benchmark is ONE :class:`Benchmark` record, read from local copies of the files
lmms-eval evaluates on.

A record holds everything about a benchmark: where its files live and what they must contain (the reader's
:class:`ParquetSource` s), its item builder (:mod:`vargpt.eval.benchmark_items`: the question prompt as
lmms-eval builds it), its generation settings (lmms-eval's ``max_new_tokens``: :meth:`Benchmark.sampling`), its
scorer (:mod:`vargpt.eval.benchmark_scores`) and the headline metrics the table shows. Adding a benchmark is
one builder, one scorer (or an existing one) and one entry in :data:`BENCHMARKS`. The model-side prompt (chat
template, ``<image>``, BOS) is the same for all: :func:`vargpt.eval.core.evaluation_context` +
``vargpt.inference.generate(model, ..., prompt_format="evaluation")``; docs/evaluation.md has the whole protocol
per benchmark.

Each benchmark is read from a local copy of its lmms-lab Hugging Face dataset, in the repository's own parquet
layout: ``<data_root>/<folder>/<files>``, which is what ``huggingface-cli download lmms-lab/POPE --repo-type
dataset --local-dir <data_root>/POPE`` produces. Nothing is downloaded here. :func:`read_benchmark` yields
uniform :class:`~vargpt.eval.benchmark_items.BenchmarkItem` s; ``item.record(prediction)`` is the line of a
predictions file, and :func:`score` turns a list of such records into the benchmark's metrics.
:func:`benchmark_fingerprint` identifies the files a benchmark was read from (``src/eval.py`` refuses to resume
predictions made from other files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vargpt.eval import benchmark_items as items
from vargpt.eval import benchmark_scores as scores
from vargpt.eval.benchmark_items import IMAGE_COLUMN, BenchmarkItem
from vargpt.eval.benchmark_scores import Scorer
from vargpt.model.sampling_config import SamplingConfig

# lmms-eval's LLaVA-style model wrappers generate up to 1024 new tokens where a task sets no limit.
DEFAULT_MAX_NEW_TOKENS = 1024
# The shapes world's held-out split (vargpt.eval.shapes_eval): no files, its own items and scores.
SHAPES = "shapes"
SHAPES_HEADLINE = ("vqa/accuracy", "t2i/both", "t2i/colour", "t2i/shape", "t2i/image_rate", "t2i/reply_objects",
                   "t2i/both_when_reply_right", "t2i/position", "t2i/position_objects", "t2i/position_chance",
                   "t2i/clip_matched", "t2i/clip_shuffled", "vqvae/psnr")  # fmt: skip
_ACCURACY = ("accuracy",)


class BenchmarkDataError(ValueError):
    """A benchmark's local files are missing or do not have the expected columns."""


class BenchmarkFileNotFoundError(BenchmarkDataError, FileNotFoundError):
    """No local file matches a benchmark's expected layout."""


@dataclass(frozen=True)
class ParquetSource:
    """Parquet files of a benchmark: a glob relative to its folder and the columns the reader needs."""

    pattern: str
    columns: tuple[str, ...]
    optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its files, item builder, generation length, scorer and headline metrics.

    The task YAMLs of TextVQA, VizWiz, MMBench and SEED-Bench also set ``until: ["ASSISTANT:"]``; VARGPT's
    lmms-eval wrapper (like ``llava_hf``) pops that setting and never uses it, so no stop string is kept here.
    """

    name: str
    lmms_eval_task: str
    hf_dataset: str
    folder: str
    source: ParquetSource
    build: Callable[[dict, int, Path], BenchmarkItem]  # (row, position, parquet file) -> item
    score: Scorer
    headline: tuple[str, ...] = _ACCURACY  # the figures the table shows (everything is in scores.json)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    images: ParquetSource | None = None  # GQA keeps its images in a second table, joined on imageId

    def sampling(self, base: Any = None, max_new_tokens: int | None = None) -> SamplingConfig:
        """``base`` (greedy by default) with the benchmark's lmms-eval length (capped at ``max_new_tokens`` when
        given), no stop string (the wrapper drops the tasks' ``until``) and no images."""
        length = self.max_new_tokens if max_new_tokens is None else min(self.max_new_tokens, int(max_new_tokens))
        return SamplingConfig.coerce(base, max_new_tokens=length, stop=[], max_images=0)


_VQA = ("question_id", "question", "answers", IMAGE_COLUMN)
_YES_NO = ("question_id", "question", "answer", "category", IMAGE_COLUMN)
BENCHMARKS: dict[str, Benchmark] = {
    spec.name: spec
    for spec in (
        Benchmark(
            "vqav2", "vqav2_val", "lmms-lab/VQAv2", "VQAv2", ParquetSource("data/validation-*.parquet", _VQA),
            items.vqav2_item, scores.vqa_scorer("vqav2"), max_new_tokens=16,
        ),
        Benchmark(
            "gqa", "gqa", "lmms-lab/GQA", "GQA",
            ParquetSource("testdev_balanced_instructions/testdev-*.parquet", ("id", "imageId", "question", "answer")),
            items.gqa_item, scores.score_gqa, max_new_tokens=16,
            images=ParquetSource("testdev_balanced_images/testdev-*.parquet", ("id", IMAGE_COLUMN)),
        ),
        Benchmark(
            "textvqa", "textvqa_val", "lmms-lab/textvqa", "textvqa", ParquetSource("data/validation-*.parquet", _VQA),
            items.textvqa_item, scores.vqa_scorer("evalai"),
        ),
        Benchmark(
            "vizwiz", "vizwiz_vqa_val", "lmms-lab/VizWiz-VQA", "VizWiz-VQA", ParquetSource("data/val-*.parquet", _VQA),
            items.vizwiz_item, scores.vqa_scorer("evalai"),
        ),
        Benchmark(
            "scienceqa_img", "scienceqa_img", "lmms-lab/ScienceQA", "ScienceQA",
            ParquetSource("ScienceQA-IMG/test-*.parquet", ("question", "choices", "answer", "hint", IMAGE_COLUMN)),
            items.scienceqa_item, scores.score_scienceqa, max_new_tokens=16,
        ),
        Benchmark(
            "pope", "pope", "lmms-lab/POPE", "POPE", ParquetSource("data/test-*.parquet", _YES_NO),
            items.pope_item, scores.score_pope,
            headline=("adversarial/pope_accuracy", "pope_accuracy", "pope_f1_score", "predicted_yes_ratio"),
            max_new_tokens=128,
        ),
        Benchmark(
            "mme", "mme", "lmms-lab/MME", "MME", ParquetSource("data/test-*.parquet", _YES_NO),
            items.mme_item, scores.score_mme, headline=("perception", "cognition"), max_new_tokens=16,
        ),
        Benchmark(
            "mmbench", "mmbench_en_dev", "lmms-lab/MMBench", "MMBench",
            ParquetSource(
                "en/dev-*.parquet",
                ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", IMAGE_COLUMN),
                optional=("E",),
            ),
            items.mmbench_item, scores.score_mmbench,
        ),
        Benchmark(
            "seedbench", "seedbench", "lmms-lab/SEED-Bench", "SEED-Bench",
            ParquetSource(
                "data/test-*.parquet",
                ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
                 IMAGE_COLUMN),
            ),
            items.seedbench_item, scores.score_seedbench, headline=("image/accuracy", "all/accuracy"),
        ),
        Benchmark(
            "mmmu", "mmmu_val", "lmms-lab/MMMU", "MMMU",
            ParquetSource(
                "data/validation-*.parquet",
                ("id", "question", "options", "answer", "question_type", *(f"image_{k}" for k in range(1, 8))),
            ),
            items.mmmu_item, scores.score_mmmu, max_new_tokens=16,
        ),
    )
}  # fmt: skip


def get_benchmark(benchmark: str) -> Benchmark:
    """The :class:`Benchmark` of a benchmark name, with a clear error for unknown names."""
    try:
        return BENCHMARKS[benchmark]
    except KeyError:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}") from None


def headline(benchmark: str) -> tuple[str, ...]:
    """The figures the table shows for a benchmark name (the shapes world's included)."""
    return SHAPES_HEADLINE if benchmark == SHAPES else get_benchmark(benchmark).headline


# ----------------------------------------------------------------------------------------------------- file access


def _expected(spec: Benchmark, source: ParquetSource) -> str:
    """What a benchmark expects, for error messages."""
    return (
        f"expected a local copy of the Hugging Face dataset {spec.hf_dataset} (e.g. `huggingface-cli download "
        f"{spec.hf_dataset} --repo-type dataset --local-dir <data_root>/{spec.folder}`) whose files "
        f"{spec.folder}/{source.pattern} have the columns {list(source.columns)}"
    )


def _source_files(spec: Benchmark, folder: Path, source: ParquetSource) -> list[Path]:
    """The files of a source, checked to exist and to have the required columns."""
    files = sorted(folder.glob(source.pattern))
    if not files:
        raise BenchmarkFileNotFoundError(
            f"benchmark {spec.name!r}: no file matches {folder / source.pattern}; {_expected(spec, source)}"
        )
    for path in files:
        names = set(pq.read_schema(path).names)
        if missing := [column for column in source.columns if column not in names]:
            raise BenchmarkDataError(
                f"benchmark {spec.name!r}: {path} lacks the column(s) {missing}; {_expected(spec, source)}"
            )
    return files


def _iter_rows(files: Sequence[Path], source: ParquetSource, limit: int | None) -> Iterator[tuple[dict, Path]]:
    """Rows (as dicts of the needed columns) and their file, streamed batch by batch, at most ``limit`` of them."""
    count = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        present = set(parquet.schema_arrow.names)
        columns = list(source.columns) + [column for column in source.optional if column in present]
        # Small batches keep memory bounded: image columns hold the encoded images.
        for batch in parquet.iter_batches(batch_size=32, columns=columns):
            for row in batch.to_pylist():
                if limit is not None and count >= limit:
                    return
                count += 1
                yield row, path


def _join_gqa_images(
    spec: Benchmark, rows: Iterator[tuple[dict, Path]], image_files: Sequence[Path]
) -> Iterator[tuple[dict, Path]]:
    """Attach to each GQA question row its ``(image cell, images file)``, reading only the images needed."""
    question_rows = list(rows)
    needed = {row["imageId"] for row, _ in question_rows}
    found: dict[str, tuple[dict, Path]] = {}
    for path in image_files if needed else []:
        table = pq.read_table(path, columns=["id", IMAGE_COLUMN], filters=[("id", "in", list(needed))])
        found.update((row["id"], (row[IMAGE_COLUMN], path)) for row in table.to_pylist())
    if missing := sorted(needed - found.keys()):
        raise BenchmarkDataError(
            f"benchmark {spec.name!r}: no image in {spec.images.pattern} for imageId {missing[:5]}"
        )
    for row, path in question_rows:
        yield {**row, IMAGE_COLUMN: found[row["imageId"]]}, path


def read_benchmark(benchmark: str, data_root: str | Path, limit: int | None = None) -> Iterator[BenchmarkItem]:
    """Items of a benchmark, in file order, from ``<data_root>/<folder>`` (see :data:`BENCHMARKS`).

    Files and columns are checked before the first item is produced: a missing file raises
    :class:`BenchmarkFileNotFoundError`, a missing column :class:`BenchmarkDataError`, both naming the benchmark, the
    Hugging Face dataset and the expected files and columns. ``limit`` reads only the first ``limit`` items.
    """
    spec = get_benchmark(benchmark)
    folder = Path(data_root) / spec.folder
    files = _source_files(spec, folder, spec.source)
    image_files = _source_files(spec, folder, spec.images) if spec.images else []

    def stream() -> Iterator[BenchmarkItem]:
        rows = _iter_rows(files, spec.source, limit)
        if spec.images:
            rows = _join_gqa_images(spec, rows, image_files)
        for index, (row, path) in enumerate(rows):
            yield spec.build(row, index, path)

    return stream()


def benchmark_fingerprint(benchmark: str, data_root: str | Path) -> dict[str, list[int]]:
    """``{file: [size in bytes, mtime in ns]}`` of the parquet files :func:`read_benchmark` reads (paths relative
    to ``data_root``): cheap, and any rewrite, replacement or new shard changes it (image files that a parquet
    file only references by path are not listed). Missing files raise as in :func:`read_benchmark`."""
    spec = get_benchmark(benchmark)
    folder = Path(data_root) / spec.folder
    sources = [spec.source, *([spec.images] if spec.images else [])]
    files = [path for source in sources for path in _source_files(spec, folder, source)]
    stats = {path.relative_to(Path(data_root)).as_posix(): path.stat() for path in files}
    return {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}


def score(benchmark: str, predictions: Sequence[Mapping[str, Any]], faithful: bool = True) -> dict[str, float]:
    """Metrics of a benchmark from prediction records (``item.record(prediction)`` dicts, e.g. a JSONL file's lines).

    Returns a flat ``{name: value}`` dict, with ``"n"`` the number of records scored. Every figure is a percentage
    (lmms-eval reports most as fractions in [0, 1]: ours are 100 times theirs), except MME's ``perception`` /
    ``cognition``, which are its points (sums of per-category ``acc + acc_plus``) as in lmms-eval.
    ``faithful=False`` repairs the lmms-eval bugs that have a repaired variant (ScienceQA's dead "A." fallback,
    MMMU's random answer for unparsable multiple-choice responses).
    """
    return {"n": float(len(predictions)), **get_benchmark(benchmark).score(predictions, faithful)}
