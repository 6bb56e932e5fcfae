"""Readers and scorers for local copies of the benchmark files lmms-eval evaluates on.

Each benchmark is read from a local copy of its lmms-lab Hugging Face dataset, in the repository's own parquet
layout: ``<data_root>/<folder>/<files>`` as listed in :data:`BENCHMARKS`, which is what
``huggingface-cli download lmms-lab/POPE --repo-type dataset --local-dir <data_root>/POPE`` produces. Nothing is
downloaded here.

:func:`read_benchmark` yields uniform :class:`BenchmarkItem` s: id, PIL image(s), the question prompt exactly as
lmms-eval builds it (pre/post prompts included, chat template not), the gold answer(s) and the fields scoring needs.
``item.record(prediction)`` is the JSON-serialisable line of a predictions file, and :func:`score` turns a list of
such records into the benchmark's metrics, in percent (MME in its own points), computed as lmms-eval does (see
:mod:`vargpt.eval.vqa` and :mod:`vargpt.eval.metrics` for every quirk and the choices made).
:func:`benchmark_fingerprint` identifies the files a benchmark was read from (``src/eval.py`` refuses to resume
predictions made from other files). The model-side prompt (chat template, ``<image>``, BOS) is
``vargpt.eval.runner.evaluation_context`` + ``model.generate(..., prompt_format="evaluation")``;
docs/evaluation.md has the whole protocol per benchmark.

Prompt quirks kept because they change what the model sees: TextVQA and VizWiz pass the question through
``str.capitalize()`` (which also lowercases the rest, "NASA" -> "nasa"); MMBench puts an empty line before its
instruction; MMMU keeps the ``<image k>`` placeholders in the text.
"""

from __future__ import annotations

import ast
import io
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from vargpt.eval.metrics import (
    exact_match,
    mmbench_circular_accuracy,
    mme_scores,
    mmmu_extract_option,
    mmmu_open_correct,
    mmmu_parse_open,
    option_letters,
    pope_metrics,
    scienceqa_correct,
    seedbench_correct,
)
from vargpt.eval.vqa import VQAScheme, vqa_accuracy

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
MME_INSTRUCTION = " Please answer yes or no."
# lmms-eval's LLaVA-style model wrappers generate up to 1024 new tokens where a task sets no limit.
DEFAULT_MAX_NEW_TOKENS = 1024


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
class BenchmarkSpec:
    """Where a benchmark's files live, what they must contain, and lmms-eval's generation length for it.

    The task YAMLs of TextVQA, VizWiz, MMBench and SEED-Bench also set ``until: ["ASSISTANT:"]``; VARGPT's
    lmms-eval wrapper (like ``llava_hf``) pops that setting and never uses it, so no stop string is kept here.
    """

    name: str
    lmms_eval_task: str
    hf_dataset: str
    folder: str
    source: ParquetSource
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    images: ParquetSource | None = None  # GQA keeps its images in a second table, joined on imageId


@dataclass(frozen=True)
class BenchmarkItem:
    """One question of a benchmark, uniform across benchmarks.

    Attributes:
        id: unique and stable within the benchmark (the dataset's question id, or the row position where it has none).
        images: the visuals lmms-eval passes to the model, as RGB PIL images (several for SEED-Bench video, MMMU).
        prompt: the question text with lmms-eval's pre/post prompts, without the model's chat template or image token.
        answers: the gold answers: the human answers for VQA-style benchmarks, else the one answer / option letter.
        fields: the per-benchmark values scoring needs (POPE/MME category, MMBench index and options, ...).
    """

    id: str
    images: list[Image.Image]
    prompt: str
    answers: list[str]
    fields: dict[str, Any]

    def record(self, prediction: str) -> dict[str, Any]:
        """The JSON-serialisable predictions-file line that :func:`score` reads (everything but the images)."""
        return {"id": self.id, "prompt": self.prompt, "answers": self.answers, **self.fields, "prediction": prediction}


_IMAGE = "image"
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "vqav2", "vqav2_val", "lmms-lab/VQAv2", "VQAv2",
            ParquetSource("data/validation-*.parquet", ("question_id", "question", "answers", _IMAGE)),
            max_new_tokens=16,
        ),
        BenchmarkSpec(
            "gqa", "gqa", "lmms-lab/GQA", "GQA",
            ParquetSource("testdev_balanced_instructions/testdev-*.parquet", ("id", "imageId", "question", "answer")),
            max_new_tokens=16,
            images=ParquetSource("testdev_balanced_images/testdev-*.parquet", ("id", _IMAGE)),
        ),
        BenchmarkSpec(
            "textvqa", "textvqa_val", "lmms-lab/textvqa", "textvqa",
            ParquetSource("data/validation-*.parquet", ("question_id", "question", "answers", _IMAGE)),
        ),
        BenchmarkSpec(
            "vizwiz", "vizwiz_vqa_val", "lmms-lab/VizWiz-VQA", "VizWiz-VQA",
            ParquetSource("data/val-*.parquet", ("question_id", "question", "answers", _IMAGE)),
        ),
        BenchmarkSpec(
            "scienceqa_img", "scienceqa_img", "lmms-lab/ScienceQA", "ScienceQA",
            ParquetSource("ScienceQA-IMG/test-*.parquet", ("question", "choices", "answer", "hint", _IMAGE)),
            max_new_tokens=16,
        ),
        BenchmarkSpec(
            "pope", "pope", "lmms-lab/POPE", "POPE",
            ParquetSource("data/test-*.parquet", ("question_id", "question", "answer", "category", _IMAGE)),
            max_new_tokens=128,
        ),
        BenchmarkSpec(
            "mme", "mme", "lmms-lab/MME", "MME",
            ParquetSource("data/test-*.parquet", ("question_id", "question", "answer", "category", _IMAGE)),
            max_new_tokens=16,
        ),
        BenchmarkSpec(
            "mmbench", "mmbench_en_dev", "lmms-lab/MMBench", "MMBench",
            ParquetSource(
                "en/dev-*.parquet",
                ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", _IMAGE),
                optional=("E",),
            ),
        ),
        BenchmarkSpec(
            "seedbench", "seedbench", "lmms-lab/SEED-Bench", "SEED-Bench",
            ParquetSource(
                "data/test-*.parquet",
                ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
                 _IMAGE),
            ),
        ),
        BenchmarkSpec(
            "mmmu", "mmmu_val", "lmms-lab/MMMU", "MMMU",
            ParquetSource(
                "data/validation-*.parquet",
                ("id", "question", "options", "answer", "question_type", *(f"image_{k}" for k in range(1, 8))),
            ),
            max_new_tokens=16,
        ),
    )
}  # fmt: skip


def get_spec(benchmark: str) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` of a benchmark name, with a clear error for unknown names."""
    try:
        return BENCHMARKS[benchmark]
    except KeyError:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}") from None


# ----------------------------------------------------------------------------------------------------- file access


def _expected(spec: BenchmarkSpec, source: ParquetSource) -> str:
    """What a benchmark expects, for error messages."""
    return (
        f"expected a local copy of the Hugging Face dataset {spec.hf_dataset} (e.g. `huggingface-cli download "
        f"{spec.hf_dataset} --repo-type dataset --local-dir <data_root>/{spec.folder}`) whose files "
        f"{spec.folder}/{source.pattern} have the columns {list(source.columns)}"
    )


def _source_files(spec: BenchmarkSpec, folder: Path, source: ParquetSource) -> list[Path]:
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


def _image(value: Mapping[str, Any] | None, parquet_path: Path) -> Image.Image | None:
    """Decode a Hugging Face ``Image`` cell (``{bytes, path}`` struct) to an RGB PIL image; ``None`` stays ``None``.

    Embedded bytes are used when present; otherwise ``path`` is opened, relative to the parquet file's folder.
    """
    if value is None:
        return None
    if value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif value.get("path"):
        image = Image.open(parquet_path.parent / value["path"])
    else:
        return None
    return image.convert("RGB")  # lmms-eval converts every visual to RGB


def _images(*values: Image.Image | None) -> list[Image.Image]:
    """The decoded images, without the missing ones."""
    return [value for value in values if value is not None]


# ---------------------------------------------------------------------------------------------- item builders
# One per benchmark, each mirroring its lmms-eval task's doc_to_visual / doc_to_text / doc_to_target. Arguments: the
# row (needed columns only), its position in the benchmark, and the parquet file it came from.


def _vqav2_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """VQAv2: the question plus the short-answer instruction; the 10 human answers."""
    answers = [entry["answer"] for entry in row["answers"] or []]
    return BenchmarkItem(
        str(row["question_id"]), _images(_image(row[_IMAGE], path)), f"{row['question']}{SHORT_ANSWER}", answers, {}
    )


def _gqa_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """GQA testdev-balanced: the question plus the short-answer instruction; the one answer."""
    # The image comes from the images table (see _join_gqa_images), decoded relative to that table's file.
    image_value, image_path = row[_IMAGE]
    return BenchmarkItem(
        str(row["id"]),
        _images(_image(image_value, image_path)),
        f"{row['question']}{SHORT_ANSWER}",
        [row["answer"]],
        {},
    )


def _textvqa_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """TextVQA val: the capitalised question plus the short-answer instruction (no OCR tokens); 10 answers."""
    return BenchmarkItem(
        str(row["question_id"]),
        _images(_image(row[_IMAGE], path)),
        f"{row['question'].capitalize()}{SHORT_ANSWER}",
        list(row["answers"] or []),
        {},
    )


def _vizwiz_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """VizWiz-VQA val: the capitalised question plus the "Unanswerable" and short-answer instructions."""
    return BenchmarkItem(
        str(row["question_id"]),
        _images(_image(row[_IMAGE], path)),
        f"{row['question'].capitalize()}{VIZWIZ_SUFFIX}",
        list(row["answers"] or []),
        {},
    )


def _scienceqa_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """ScienceQA-IMG test: optional "Context:" hint, question, lettered choices, option-letter instruction."""
    choices = list(row["choices"])
    letters = option_letters(len(choices))
    # Upstream renders a null hint as "None"; the lmms-lab files use "" for "no hint", which both treat alike.
    context = f"Context: {row['hint']}\n" if row["hint"] else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    return BenchmarkItem(
        str(index),  # the files have no id column; the row position is stable for a given copy
        _images(_image(row[_IMAGE], path)),
        f"{context}{row['question']}\n{options}{OPTION_LETTER}",
        [letters[row["answer"]]],
        {},
    )


def _pope_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """POPE (all three categories): the stripped question plus the short-answer instruction; "yes" or "no"."""
    return BenchmarkItem(
        f"{row['category']}/{row['question_id']}",  # question ids restart in each of the three categories
        _images(_image(row[_IMAGE], path)),
        f"{row['question'].strip()}{SHORT_ANSWER}",
        [row["answer"]],
        {"category": row["category"]},
    )


def _mme_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """MME: the question with its " Please answer yes or no." swapped for the short-answer instruction."""
    question = row["question"].strip().replace(MME_INSTRUCTION, "")
    return BenchmarkItem(
        str(index),  # question_id names the image, shared by the two questions of a pair
        _images(_image(row[_IMAGE], path)),
        f"{question}{SHORT_ANSWER}",
        [row["answer"]],
        {"question_id": row["question_id"], "category": row["category"]},
    )


def _mmbench_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """MMBench-EN dev: hint, question, "There are several options:" list, option-letter instruction."""
    options = {letter: row[letter] for letter in "ABCDE" if row.get(letter) and row[letter] != "nan"}
    options_prompt = "\n".join(["There are several options:", *(f"{k}. {v}" for k, v in options.items())])
    hint = row["hint"]
    head = f"{hint} {row['question']}" if hint is not None and hint != "nan" else row["question"]
    return BenchmarkItem(
        str(row["index"]),
        _images(_image(row[_IMAGE], path)),
        # lmms-eval joins with "\n" and its post prompt starts with "\n" too: an empty line, kept.
        f"{head} {options_prompt}\n{OPTION_LETTER}",
        [row["answer"]],
        {"index": int(row["index"]), "category": row["category"], "options": options},
    )


def _seedbench_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """SEED-Bench: question, four lettered choices, option-letter instruction; all images (video frames too)."""
    choices = "\n".join(f"{letter}. {row[f'choice_{letter.lower()}']}" for letter in "ABCD")
    return BenchmarkItem(
        str(row["question_id"]),
        _images(*(_image(value, path) for value in row[_IMAGE] or [])),
        f"{row['question']}\n{choices}{OPTION_LETTER}",
        [row["answer"]],
        {"data_type": row["data_type"]},
    )


_MMMU_IMAGE_TOKEN = re.compile(r"<image \d+>")


def _mmmu_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """MMMU val: multiple-choice (lettered options, option-letter instruction) or open (short-answer instruction)."""
    multiple_choice = row["question_type"] == "multiple-choice"
    # The MMMU files store the options as the repr of a Python list.
    options = [str(option) for option in ast.literal_eval(row["options"])] if multiple_choice else []
    if multiple_choice:
        listed = "\n".join(f"{k}. {option}" for k, option in zip(option_letters(len(options)), options, strict=True))
        text = f"{row['question']}\n{listed}\n\n"
        prompt = text + OPTION_LETTER.lstrip("\n")
    else:
        text = f"{row['question']}\n\n"
        prompt = text + SHORT_ANSWER.lstrip("\n")
    # As upstream: the images are those whose <image k> token occurs in the question or options, in column order.
    columns = sorted({token.strip("<>").replace(" ", "_") for token in _MMMU_IMAGE_TOKEN.findall(text)})
    return BenchmarkItem(
        str(row["id"]),
        _images(*(_image(row.get(column), path) for column in columns)),
        prompt,
        [row["answer"]],
        {"question_type": row["question_type"], "options": options},
    )


_ITEM_BUILDERS: dict[str, Callable[[dict, int, Path], BenchmarkItem]] = {
    "vqav2": _vqav2_item,
    "gqa": _gqa_item,
    "textvqa": _textvqa_item,
    "vizwiz": _vizwiz_item,
    "scienceqa_img": _scienceqa_item,
    "pope": _pope_item,
    "mme": _mme_item,
    "mmbench": _mmbench_item,
    "seedbench": _seedbench_item,
    "mmmu": _mmmu_item,
}


def _join_gqa_images(
    spec: BenchmarkSpec, rows: Iterator[tuple[dict, Path]], image_files: Sequence[Path]
) -> Iterator[tuple[dict, Path]]:
    """Attach to each GQA question row its ``(image cell, images file)``, reading only the images needed."""
    question_rows = list(rows)
    needed = {row["imageId"] for row, _ in question_rows}
    found: dict[str, tuple[dict, Path]] = {}
    for path in image_files if needed else []:
        table = pq.read_table(path, columns=["id", _IMAGE], filters=[("id", "in", list(needed))])
        found.update((row["id"], (row[_IMAGE], path)) for row in table.to_pylist())
    if missing := sorted(needed - found.keys()):
        raise BenchmarkDataError(
            f"benchmark {spec.name!r}: no image in {spec.images.pattern} for imageId {missing[:5]}"
        )
    for row, path in question_rows:
        yield {**row, _IMAGE: found[row["imageId"]]}, path


def read_benchmark(benchmark: str, data_root: str | Path, limit: int | None = None) -> Iterator[BenchmarkItem]:
    """Items of a benchmark, in file order, from ``<data_root>/<folder>`` (see :data:`BENCHMARKS`).

    Files and columns are checked before the first item is produced: a missing file raises
    :class:`BenchmarkFileNotFoundError`, a missing column :class:`BenchmarkDataError`, both naming the benchmark, the
    Hugging Face dataset and the expected files and columns. ``limit`` reads only the first ``limit`` items.
    """
    spec = get_spec(benchmark)
    folder = Path(data_root) / spec.folder
    files = _source_files(spec, folder, spec.source)
    image_files = _source_files(spec, folder, spec.images) if spec.images else []
    build = _ITEM_BUILDERS[spec.name]

    def items() -> Iterator[BenchmarkItem]:
        rows = _iter_rows(files, spec.source, limit)
        if spec.images:
            rows = _join_gqa_images(spec, rows, image_files)
        for index, (row, path) in enumerate(rows):
            yield build(row, index, path)

    return items()


def benchmark_fingerprint(benchmark: str, data_root: str | Path) -> dict[str, list[int]]:
    """``{file: [size in bytes, mtime in ns]}`` of the parquet files :func:`read_benchmark` reads (paths relative
    to ``data_root``): cheap, and any rewrite, replacement or new shard changes it (image files that a parquet
    file only references by path are not listed). Missing files raise as in :func:`read_benchmark`."""
    spec = get_spec(benchmark)
    folder = Path(data_root) / spec.folder
    sources = [spec.source, *([spec.images] if spec.images else [])]
    files = [path for source in sources for path in _source_files(spec, folder, source)]
    stats = {path.relative_to(Path(data_root)).as_posix(): path.stat() for path in files}
    return {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}


# ------------------------------------------------------------------------------------------------------- scoring


def _percent(values: Sequence[float]) -> float:
    """Mean of per-item scores in percent (0 for no items)."""
    return 100.0 * sum(values) / len(values) if values else 0.0


def _vqa_scorer(scheme: VQAScheme) -> Callable[[Sequence[Mapping[str, Any]], bool], dict[str, float]]:
    """A scorer averaging :func:`vqa_accuracy` with the given normalisation scheme."""

    def scorer(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
        """Mean VQA accuracy in percent."""
        return {"accuracy": _percent([vqa_accuracy(r["prediction"], r["answers"], scheme) for r in records])}

    return scorer


def _score_gqa(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Exact match, ignoring case and punctuation."""
    return {"accuracy": _percent([exact_match(r["prediction"], r["answers"][0]) for r in records])}


def _score_scienceqa(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Option-letter accuracy."""
    return {"accuracy": _percent([scienceqa_correct(r["prediction"], r["answers"][0], faithful) for r in records])}


def _score_pope(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Overall POPE metrics (lmms-eval's ``pope`` task's, plus ``predicted_yes_ratio``: see
    :func:`~vargpt.eval.metrics.pope_metrics`) and the same per category (adversarial / popular / random; VARGPT
    reports adversarial accuracy), in percent."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list, {"": []})
    for record in records:
        groups[""].append(record)
        groups[f"{record['category']}/"].append(record)
    scores = {}
    for prefix, group in sorted(groups.items()):
        metrics = pope_metrics([r["prediction"] for r in group], [r["answers"][0] for r in group])
        scores.update({f"{prefix}{name}": 100.0 * value for name, value in metrics.items()})
    return scores


def _score_mme(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Per-category acc / acc+ / score and the perception and cognition sums."""
    return mme_scores((r["question_id"], r["category"], r["prediction"], r["answers"][0]) for r in records)


def _score_mmbench(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """CircularEval accuracy over the questions whose original row was scored."""
    accuracy, _ = mmbench_circular_accuracy(
        (r["index"], r["prediction"], r["answers"][0], r["options"]) for r in records
    )
    return {"accuracy": 100.0 * accuracy}


def _score_seedbench(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Accuracy over all questions and per data type ("image", "video"; VARGPT reports SEED-Bench images)."""
    by_type: dict[str, list[float]] = defaultdict(list, {"all": []})
    for record in records:
        hit = seedbench_correct(record["prediction"], record["answers"][0])
        by_type["all"].append(hit)
        by_type[record["data_type"]].append(hit)
    return {f"{data_type}/accuracy": _percent(hits) for data_type, hits in sorted(by_type.items())}


def _mmmu_correct(record: Mapping[str, Any], faithful: bool) -> float:
    """One MMMU question: the parsed option letter, or the parsed open answer, against the gold answer."""
    answer, prediction = record["answers"][0], record["prediction"]
    if record["question_type"] == "multiple-choice":
        return float(mmmu_extract_option(prediction, record["options"], record["id"], faithful) == answer)
    return mmmu_open_correct(answer, mmmu_parse_open(prediction))


def _score_mmmu(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Accuracy over multiple-choice and open questions."""
    # Upstream averages per subject weighted by size, which equals the plain mean over questions.
    return {"accuracy": _percent([_mmmu_correct(r, faithful) for r in records])}


_SCORERS: dict[str, Callable[[Sequence[Mapping[str, Any]], bool], dict[str, float]]] = {
    "vqav2": _vqa_scorer("vqav2"),
    "gqa": _score_gqa,
    "textvqa": _vqa_scorer("evalai"),
    "vizwiz": _vqa_scorer("evalai"),
    "scienceqa_img": _score_scienceqa,
    "pope": _score_pope,
    "mme": _score_mme,
    "mmbench": _score_mmbench,
    "seedbench": _score_seedbench,
    "mmmu": _score_mmmu,
}


def score(benchmark: str, predictions: Sequence[Mapping[str, Any]], faithful: bool = True) -> dict[str, float]:
    """Metrics of a benchmark from prediction records (``item.record(prediction)`` dicts, e.g. a JSONL file's lines).

    Returns a flat ``{name: value}`` dict, with ``"n"`` the number of records scored. Every figure is a percentage
    (lmms-eval reports most as fractions in [0, 1]: ours are 100 times theirs), except MME's ``perception`` /
    ``cognition``, which are its points (sums of per-category ``acc + acc_plus``) as in lmms-eval.
    ``faithful=False`` repairs the lmms-eval bugs that have a repaired variant (ScienceQA's dead "A." fallback,
    MMMU's random answer for unparsable multiple-choice responses).
    """
    scores = _SCORERS[get_spec(benchmark).name](predictions, faithful)
    return {"n": float(len(predictions)), **scores}
