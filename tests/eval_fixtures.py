"""Tiny copies of every benchmark's lmms-lab parquet files, in their real column layouts (two or three rows each).

``write_benchmark(name, root)`` writes ``<root>/<folder>/...`` as ``huggingface-cli download`` would lay it out;
the cell helpers (``png``, ``write``) are those of ``test_eval_benchmarks.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from test_eval_benchmarks import IMAGE, STRING, STRINGS, png, write

INT = pa.int64()


def _vqav2(root: Path) -> None:
    answer = pa.struct([("answer", STRING), ("answer_confidence", STRING), ("answer_id", INT)])
    answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(group)]
               for group in (["2"] * 10, ["red"] * 3 + ["blue"] * 7, ["yes"] * 10)]  # fmt: skip
    write(root, "VQAv2/data/validation-00000-of-00001.parquet", {
        "answers": (pa.list_(answer), answers),
        "question_id": (INT, [10, 20, 30]),
        "question": (STRING, ["How many cats?", "What color is the car?", "Is it sunny?"]),
        "image": (IMAGE, [png("red"), png("blue"), png("green")]),
    })  # fmt: skip


def _gqa(root: Path) -> None:
    write(root, "GQA/testdev_balanced_instructions/testdev-00000-of-00001.parquet", {
        "id": (STRING, ["q1", "q2"]),
        "imageId": (STRING, ["n2", "n1"]),
        "question": (STRING, ["Is the sky blue?", "Which side is the dog on?"]),
        "answer": (STRING, ["yes", "left"]),
    })  # fmt: skip
    write(root, "GQA/testdev_balanced_images/testdev-00000-of-00001.parquet",
          {"id": (STRING, ["n1", "n2"]), "image": (IMAGE, [png("red"), png("blue")])})  # fmt: skip


def _textvqa(root: Path) -> None:
    write(root, "textvqa/data/validation-00000-of-00001.parquet", {
        "question_id": (pa.int32(), [7, 8]),
        "question": (STRING, ["what does the sign say?", "what brand is it?"]),
        "image": (IMAGE, [png("white"), png("gray")]),
        "answers": (STRINGS, [["stop"] * 10, ["nike"] * 10]),
    })  # fmt: skip


def _vizwiz(root: Path) -> None:
    write(root, "VizWiz-VQA/data/val-00000-of-00001.parquet", {
        "question_id": (STRING, ["VizWiz_val_00000001", "VizWiz_val_00000002"]),
        "image": (IMAGE, [png("gray"), png("white")]),
        "question": (STRING, ["what is this?", "what color is this?"]),
        "answers": (STRINGS, [["unanswerable"] * 10, ["white"] * 10]),
    })  # fmt: skip


def _scienceqa(root: Path) -> None:
    write(root, "ScienceQA/ScienceQA-IMG/test-00000-of-00001.parquet", {
        "image": (IMAGE, [png("red"), png("blue")]),
        "question": (STRING, ["Which animal is a mammal?", "Which is hotter?"]),
        "choices": (STRINGS, [["frog", "dog", "fish"], ["ice", "fire"]]),
        "answer": (pa.int8(), [1, 1]),
        "hint": (STRING, ["Look at the picture.", ""]),
    })  # fmt: skip


def _pope(root: Path) -> None:
    write(root, "POPE/data/test-00000-of-00001.parquet", {
        "id": (STRING, ["0", "1", "2", "3"]),
        "question_id": (STRING, ["1", "2", "1", "2"]),
        "question": (STRING, ["Is there a dog in the image?", "Is there a cat in the image?"] * 2),
        "answer": (STRING, ["yes", "no", "yes", "no"]),
        "image": (IMAGE, [png("red"), png("blue"), png("green"), png("white")]),
        "category": (STRING, ["adversarial", "adversarial", "random", "random"]),
    })  # fmt: skip


def _mme(root: Path) -> None:
    write(root, "MME/data/test-00000-of-00001.parquet", {
        "question_id": (STRING, ["artwork/1.jpg", "artwork/1.jpg", "code_reasoning/2.png", "code_reasoning/2.png"]),
        "image": (IMAGE, [png("red")] * 4),
        "question": (STRING, ["Is this a painting? Please answer yes or no.", "Is this a photo?"] * 2),
        "answer": (STRING, ["Yes", "No", "Yes", "No"]),
        "category": (STRING, ["artwork", "artwork", "code_reasoning", "code_reasoning"]),
    })  # fmt: skip


def _mmbench(root: Path) -> None:
    write(root, "MMBench/en/dev-00000-of-00001.parquet", {
        "index": (INT, [5, 1_000_005]),
        "question": (STRING, ["What animal is shown?"] * 2),
        "hint": (STRING, [None, "It barks."]),
        "answer": (STRING, ["A", "B"]),
        "A": (STRING, ["dog", "cat"]),
        "B": (STRING, ["cat", "dog"]),
        "C": (STRING, [None, None]),
        "D": (STRING, [None, None]),
        "category": (STRING, ["animal", "animal"]),
        "image": (IMAGE, [png("red"), png("red")]),
    })  # fmt: skip


def _seedbench(root: Path) -> None:
    write(root, "SEED-Bench/data/test-00000-of-00001.parquet", {
        "answer": (STRING, ["C", "A"]),
        "choice_a": (STRING, ["one", "run"]),
        "choice_b": (STRING, ["two", "walk"]),
        "choice_c": (STRING, ["three", "sit"]),
        "choice_d": (STRING, ["four", "jump"]),
        "data_type": (STRING, ["image", "video"]),
        "question": (STRING, ["How many cats?", "What is the person doing?"]),
        "question_id": (STRING, ["101", "102"]),
        "image": (pa.list_(IMAGE), [[png("red")], [png("red"), png("blue")]]),
    })  # fmt: skip


def _mmmu(root: Path) -> None:
    write(root, "MMMU/data/validation-00000-of-00001.parquet", {
        "id": (STRING, ["validation_Art_1", "validation_Math_2"]),
        "question": (STRING, ["Which style is <image 1>?", "What is 6 x 7 in <image 1>?"]),
        "options": (STRING, ["['Baroque', 'Cubism']", "[]"]),
        "image_1": (IMAGE, [png("red"), png("green")]),
        **{f"image_{k}": (IMAGE, [None, None]) for k in range(2, 8)},
        "answer": (STRING, ["B", "42"]),
        "question_type": (STRING, ["multiple-choice", "open"]),
    })  # fmt: skip


WRITERS: dict[str, Callable[[Path], None]] = {
    "vqav2": _vqav2,
    "gqa": _gqa,
    "textvqa": _textvqa,
    "vizwiz": _vizwiz,
    "scienceqa_img": _scienceqa,
    "pope": _pope,
    "mme": _mme,
    "mmbench": _mmbench,
    "seedbench": _seedbench,
    "mmmu": _mmmu,
}


def write_benchmark(name: str, root: Path) -> None:
    """Write the tiny copy of benchmark ``name`` under ``root``."""
    WRITERS[name](root)


def write_all(root: Path) -> Path:
    """Every benchmark's tiny copy under ``root``; returns ``root``."""
    for writer in WRITERS.values():
        writer(root)
    return root
