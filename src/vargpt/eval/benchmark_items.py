"""Benchmark questions as the model is asked them: the uniform :class:`BenchmarkItem` and one item builder per
benchmark, each mirroring its lmms-eval task's ``doc_to_visual`` / ``doc_to_text`` / ``doc_to_target``.

A builder takes a parquet row (the needed columns only), its position in the benchmark and the parquet file it
came from, and returns the item: id, RGB PIL image(s), the question prompt exactly as lmms-eval builds it
(pre/post prompts included, chat template not), the gold answer(s) and the fields scoring needs. The registry
(:data:`vargpt.eval.benchmarks.BENCHMARKS`) names each benchmark's builder.

Prompt quirks kept because they change what the model sees: TextVQA and VizWiz pass the question through
``str.capitalize()`` (which also lowercases the rest, "NASA" -> "nasa"); MMBench puts an empty line before its
instruction; MMMU keeps the ``<image k>`` placeholders in the text.
"""

from __future__ import annotations

import ast
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vargpt.eval.metrics import option_letters

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
MME_INSTRUCTION = " Please answer yes or no."
# The image column of the lmms-lab files (GQA's images table too).
IMAGE_COLUMN = "image"


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
        """The JSON-serialisable predictions-file line that :func:`vargpt.eval.benchmarks.score` reads (all but
        the images)."""
        return {"id": self.id, "prompt": self.prompt, "answers": self.answers, **self.fields, "prediction": prediction}


def decode_image(value: Mapping[str, Any] | None, parquet_path: Path) -> Image.Image | None:
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


def present_images(*values: Image.Image | None) -> list[Image.Image]:
    """The decoded images, without the missing ones."""
    return [value for value in values if value is not None]


# ---------------------------------------------------------------------------------------------- item builders
# Arguments: the row (needed columns only), its position in the benchmark, and the parquet file it came from.


def vqav2_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """VQAv2: the question plus the short-answer instruction; the 10 human answers."""
    answers = [entry["answer"] for entry in row["answers"] or []]
    return BenchmarkItem(
        str(row["question_id"]),
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        f"{row['question']}{SHORT_ANSWER}",
        answers,
        {},
    )


def gqa_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """GQA testdev-balanced: the question plus the short-answer instruction; the one answer."""
    # The image comes from the images table (see _join_gqa_images), decoded relative to that table's file.
    image_value, image_path = row[IMAGE_COLUMN]
    return BenchmarkItem(
        str(row["id"]),
        present_images(decode_image(image_value, image_path)),
        f"{row['question']}{SHORT_ANSWER}",
        [row["answer"]],
        {},
    )


def textvqa_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """TextVQA val: the capitalised question plus the short-answer instruction (no OCR tokens); 10 answers."""
    return BenchmarkItem(
        str(row["question_id"]),
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        f"{row['question'].capitalize()}{SHORT_ANSWER}",
        list(row["answers"] or []),
        {},
    )


def vizwiz_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """VizWiz-VQA val: the capitalised question plus the "Unanswerable" and short-answer instructions."""
    return BenchmarkItem(
        str(row["question_id"]),
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        f"{row['question'].capitalize()}{VIZWIZ_SUFFIX}",
        list(row["answers"] or []),
        {},
    )


def scienceqa_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """ScienceQA-IMG test: optional "Context:" hint, question, lettered choices, option-letter instruction."""
    choices = list(row["choices"])
    letters = option_letters(len(choices))
    # Upstream renders a null hint as "None"; the lmms-lab files use "" for "no hint", which both treat alike.
    context = f"Context: {row['hint']}\n" if row["hint"] else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    return BenchmarkItem(
        str(index),  # the files have no id column; the row position is stable for a given copy
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        f"{context}{row['question']}\n{options}{OPTION_LETTER}",
        [letters[row["answer"]]],
        {},
    )


def pope_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """POPE (all three categories): the stripped question plus the short-answer instruction; "yes" or "no"."""
    return BenchmarkItem(
        f"{row['category']}/{row['question_id']}",  # question ids restart in each of the three categories
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        f"{row['question'].strip()}{SHORT_ANSWER}",
        [row["answer"]],
        {"category": row["category"]},
    )


def mme_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """MME: the question with its " Please answer yes or no." swapped for the short-answer instruction."""
    question = row["question"].strip().replace(MME_INSTRUCTION, "")
    return BenchmarkItem(
        str(index),  # question_id names the image, shared by the two questions of a pair
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        f"{question}{SHORT_ANSWER}",
        [row["answer"]],
        {"question_id": row["question_id"], "category": row["category"]},
    )


def mmbench_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """MMBench-EN dev: hint, question, "There are several options:" list, option-letter instruction."""
    options = {letter: row[letter] for letter in "ABCDE" if row.get(letter) and row[letter] != "nan"}
    options_prompt = "\n".join(["There are several options:", *(f"{k}. {v}" for k, v in options.items())])
    hint = row["hint"]
    head = f"{hint} {row['question']}" if hint is not None and hint != "nan" else row["question"]
    return BenchmarkItem(
        str(row["index"]),
        present_images(decode_image(row[IMAGE_COLUMN], path)),
        # lmms-eval joins with "\n" and its post prompt starts with "\n" too: an empty line, kept.
        f"{head} {options_prompt}\n{OPTION_LETTER}",
        [row["answer"]],
        {"index": int(row["index"]), "category": row["category"], "options": options},
    )


def seedbench_item(row: dict, index: int, path: Path) -> BenchmarkItem:
    """SEED-Bench: question, four lettered choices, option-letter instruction; all images (video frames too)."""
    choices = "\n".join(f"{letter}. {row[f'choice_{letter.lower()}']}" for letter in "ABCD")
    return BenchmarkItem(
        str(row["question_id"]),
        present_images(*(decode_image(value, path) for value in row[IMAGE_COLUMN] or [])),
        f"{row['question']}\n{choices}{OPTION_LETTER}",
        [row["answer"]],
        {"data_type": row["data_type"]},
    )


_MMMU_IMAGE_TOKEN = re.compile(r"<image \d+>")


def mmmu_item(row: dict, index: int, path: Path) -> BenchmarkItem:
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
        present_images(*(decode_image(row.get(column), path) for column in columns)),
        prompt,
        [row["answer"]],
        {"question_type": row["question_type"], "options": options},
    )
