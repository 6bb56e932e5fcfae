"""Benchmark readers on tiny parquet files written in the lmms-lab column layouts, and per-benchmark scoring."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vargpt.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkDataError,
    BenchmarkFileNotFoundError,
    BenchmarkItem,
    read_benchmark,
    score,
)

# The Hugging Face `Image` feature as stored in parquet.
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color: str, size: tuple[int, int] = (8, 6)) -> dict[str, Any]:
    """An image cell: a small PNG embedded as bytes, as the lmms-lab files store images."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": f"{color}.png"}


def write(root: Path, relative: str, columns: dict[str, tuple[pa.DataType, list[Any]]]) -> Path:
    """Write a parquet file with an explicit schema under ``root``."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(name, dtype) for name, (dtype, _) in columns.items()])
    table = pa.table({name: pa.array(values, type=dtype) for name, (dtype, values) in columns.items()}, schema=schema)
    pq.write_table(table, path)
    return path


def read(benchmark: str, root: Path, **kwargs: Any) -> list[BenchmarkItem]:
    return list(read_benchmark(benchmark, root, **kwargs))


def records(items: list[BenchmarkItem], predictions: list[str]) -> list[dict[str, Any]]:
    """Prediction records as a predictions file would hold them (through a JSON round trip)."""
    return [json.loads(json.dumps(item.record(p))) for item, p in zip(items, predictions, strict=True)]


STRING = pa.string()
STRINGS = pa.list_(pa.string())


def test_vqav2(tmp_path: Path) -> None:
    answer = pa.struct([("answer", STRING), ("answer_confidence", STRING), ("answer_id", pa.int64())])
    answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(group)] for group in
               (["2"] * 10, ["red"] * 3 + ["blue"] * 7)]  # fmt: skip
    columns = {
        "question_type": (STRING, ["how many", "what color"]),
        "multiple_choice_answer": (STRING, ["2", "blue"]),
        "answers": (pa.list_(answer), answers),
        "image_id": (pa.int64(), [1, 2]),
        "answer_type": (STRING, ["number", "other"]),
        "question_id": (pa.int64(), [10, 20]),
        "question": (STRING, ["How many cats?", "What color is the car?"]),
        "image": (IMAGE, [png("red"), png("blue")]),
    }
    write(tmp_path, "VQAv2/data/validation-00000-of-00002.parquet", columns)
    items = read("vqav2", tmp_path)
    assert [item.id for item in items] == ["10", "20"]
    assert items[0].prompt == "How many cats?\nAnswer the question using a single word or phrase."
    assert items[1].answers == ["red"] * 3 + ["blue"] * 7
    assert items[0].images[0].size == (8, 6) and items[0].images[0].mode == "RGB"
    result = score("vqav2", records(items, ["Two", "red"]))
    assert result == pytest.approx({"n": 2, "accuracy": 95.0})


def test_gqa_joins_images(tmp_path: Path) -> None:
    write(
        tmp_path,
        "GQA/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
        {
            "id": (STRING, ["q1", "q2"]),
            "imageId": (STRING, ["n2", "n1"]),
            "question": (STRING, ["Is the sky blue?", "Which side is the dog on?"]),
            "answer": (STRING, ["yes", "left"]),
            "fullAnswer": (STRING, ["Yes, the sky is blue.", "The dog is on the left."]),
            "isBalanced": (pa.bool_(), [True, True]),
        },
    )
    write(
        tmp_path,
        "GQA/testdev_balanced_images/testdev-00000-of-00001.parquet",
        {"id": (STRING, ["n1", "n2", "n3"]), "image": (IMAGE, [png("red"), png("blue"), png("green")])},
    )
    items = read("gqa", tmp_path)
    assert [item.id for item in items] == ["q1", "q2"]
    assert items[0].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert items[1].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert items[0].prompt == "Is the sky blue?\nAnswer the question using a single word or phrase."
    assert score("gqa", records(items, ["Yes.", "right"]))["accuracy"] == 50.0


def test_gqa_missing_image_is_a_data_error(tmp_path: Path) -> None:
    write(
        tmp_path,
        "GQA/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
        {k: (STRING, [v]) for k, v in {"id": "q1", "imageId": "n9", "question": "?", "answer": "yes"}.items()},
    )
    write(
        tmp_path,
        "GQA/testdev_balanced_images/testdev-00000-of-00001.parquet",
        {"id": (STRING, ["n1"]), "image": (IMAGE, [png("red")])},
    )
    with pytest.raises(BenchmarkDataError, match="n9"):
        read("gqa", tmp_path)


def test_textvqa_and_vizwiz(tmp_path: Path) -> None:
    write(
        tmp_path,
        "textvqa/data/validation-00000-of-00001.parquet",
        {
            "image_id": (STRING, ["i1"]),
            "question_id": (pa.int32(), [7]),
            "question": (STRING, ["what does the NASA sign say?"]),
            "question_tokens": (STRINGS, [["what", "does"]]),
            "image": (IMAGE, [png("white")]),
            "answers": (STRINGS, [["Launch", "launch", "launch.", "go", "go", "go", "go", "go", "go", "go"]]),
            "ocr_tokens": (STRINGS, [["LAUNCH"]]),
        },
    )
    write(
        tmp_path,
        "VizWiz-VQA/data/val-00000-of-00001.parquet",
        {
            "question_id": (STRING, ["VizWiz_val_00000001"]),
            "image": (IMAGE, [png("gray")]),
            "question": (STRING, ["what is this?"]),
            "answers": (STRINGS, [["unanswerable"] * 10]),
            "category": (STRING, ["unanswerable"]),
        },
    )
    (textvqa,) = read("textvqa", tmp_path)
    # str.capitalize lowercases the rest of the question, as lmms-eval does.
    assert textvqa.prompt == "What does the nasa sign say?\nAnswer the question using a single word or phrase."
    assert score("textvqa", records([textvqa], ["LAUNCH"]))["accuracy"] == pytest.approx(90.0)
    (vizwiz,) = read("vizwiz", tmp_path)
    assert vizwiz.id == "VizWiz_val_00000001"
    assert vizwiz.prompt == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
        "\nAnswer the question using a single word or phrase."
    )
    assert score("vizwiz", records([vizwiz], ["Unanswerable"]))["accuracy"] == 100.0


def test_scienceqa_img(tmp_path: Path) -> None:
    write(
        tmp_path,
        "ScienceQA/ScienceQA-IMG/test-00000-of-00001.parquet",
        {
            "image": (IMAGE, [png("red"), png("blue")]),
            "question": (STRING, ["Which animal is a mammal?", "Which is hotter?"]),
            "choices": (STRINGS, [["frog", "dog", "fish"], ["ice", "fire"]]),
            "answer": (pa.int8(), [1, 1]),
            "hint": (STRING, ["Look at the picture.", ""]),
            "task": (STRING, ["closed choice", "closed choice"]),
            "subject": (STRING, ["natural science", "natural science"]),
        },
    )
    items = read("scienceqa_img", tmp_path)
    assert [item.id for item in items] == ["0", "1"]
    assert items[0].prompt == (
        "Context: Look at the picture.\nWhich animal is a mammal?\nA. frog\nB. dog\nC. fish"
        "\nAnswer with the option's letter from the given choices directly."
    )
    assert items[1].prompt.startswith("Which is hotter?\nA. ice\nB. fire\n")
    assert [item.answers for item in items] == [["B"], ["B"]]
    predictions = records(items, ["b", "B. fire"])
    assert score("scienceqa_img", predictions)["accuracy"] == 50.0
    assert score("scienceqa_img", predictions, faithful=False)["accuracy"] == 100.0


def test_pope(tmp_path: Path) -> None:
    categories = ["adversarial", "adversarial", "random", "random"]
    write(
        tmp_path,
        "POPE/data/test-00000-of-00001.parquet",
        {
            "id": (STRING, ["0", "1", "2", "3"]),
            "question_id": (STRING, ["1", "2", "1", "2"]),
            "question": (STRING, [" Is there a dog in the image? "] * 4),
            "answer": (STRING, ["yes", "no", "yes", "no"]),
            "image_source": (STRING, ["COCO_1"] * 4),
            "image": (IMAGE, [png("red")] * 4),
            "category": (STRING, categories),
        },
    )
    items = read("pope", tmp_path)
    assert [item.id for item in items] == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert items[0].prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    result = score("pope", records(items, ["yes", "yes", "Yes", "no"]))
    assert result["pope_accuracy"] == 75.0
    assert result["adversarial/pope_accuracy"] == 50.0
    assert result["adversarial/predicted_yes_ratio"] == 100.0
    assert result["random/pope_f1_score"] == 100.0
    assert result["pope_yes_ratio"] == 50.0  # lmms-eval's: the ground truth's share of yes
    assert result["predicted_yes_ratio"] == 75.0  # ours: the predictions' share of yes


def test_mme(tmp_path: Path) -> None:
    write(
        tmp_path,
        "MME/data/test-00000-of-00001.parquet",
        {
            "question_id": (STRING, ["artwork/1.jpg", "artwork/1.jpg", "code_reasoning/2.png", "code_reasoning/2.png"]),
            "image": (IMAGE, [png("red")] * 4),
            "question": (STRING, ["Is this a painting? Please answer yes or no.", "Is this a photo?"] * 2),
            "answer": (STRING, ["Yes", "No", "Yes", "No"]),
            "category": (STRING, ["artwork", "artwork", "code_reasoning", "code_reasoning"]),
        },
    )
    items = read("mme", tmp_path)
    assert [item.id for item in items] == ["0", "1", "2", "3"]
    assert items[0].prompt == "Is this a painting?\nAnswer the question using a single word or phrase."
    result = score("mme", records(items, ["Yes", "No", "Yes", "Yes"]))
    assert result["perception"] == 200.0
    assert result["cognition"] == 50.0
    assert result["code_reasoning/acc"] == 50.0


def test_mmbench_circular(tmp_path: Path) -> None:
    write(
        tmp_path,
        "MMBench/en/dev-00000-of-00001.parquet",
        {
            "index": (pa.int64(), [5, 1_000_005]),
            "question": (STRING, ["What animal is shown?"] * 2),
            "hint": (STRING, [None, "It barks."]),
            "answer": (STRING, ["A", "B"]),
            "A": (STRING, ["dog", "cat"]),
            "B": (STRING, ["cat", "dog"]),
            "C": (STRING, [None, None]),
            "D": (STRING, [None, None]),
            "category": (STRING, ["animal", "animal"]),
            "image": (IMAGE, [png("red"), png("red")]),
            "source": (STRING, ["x", "x"]),
            "L2-category": (STRING, ["y", "y"]),
            "comment": (STRING, [None, None]),
            "split": (STRING, ["dev", "dev"]),
        },
    )
    first, copy = read("mmbench", tmp_path)
    assert first.prompt == (
        "What animal is shown? There are several options:\nA. dog\nB. cat"
        "\n\nAnswer with the option's letter from the given choices directly."
    )
    assert copy.prompt.startswith("It barks. What animal is shown? There are several options:\nA. cat\nB. dog\n\n")
    assert first.fields["options"] == {"A": "dog", "B": "cat"}
    assert score("mmbench", records([first, copy], ["A", "The dog"]))["accuracy"] == 100.0
    assert score("mmbench", records([first, copy], ["A", "A"]))["accuracy"] == 0.0


def test_seedbench(tmp_path: Path) -> None:
    write(
        tmp_path,
        "SEED-Bench/data/test-00000-of-00001.parquet",
        {
            "answer": (STRING, ["C", "A"]),
            "choice_a": (STRING, ["one", "run"]),
            "choice_b": (STRING, ["two", "walk"]),
            "choice_c": (STRING, ["three", "sit"]),
            "choice_d": (STRING, ["four", "jump"]),
            "data_id": (STRING, ["1.jpg", "v.mp4"]),
            "data_type": (STRING, ["image", "video"]),
            "question": (STRING, ["How many cats?", "What is the person doing?"]),
            "question_id": (STRING, ["101", "102"]),
            "question_type_id": (pa.int16(), [1, 10]),
            "image": (pa.list_(IMAGE), [[png("red")], [png("red"), png("blue")]]),
            "segment": (STRING, [None, "[0, 1]"]),
        },
    )
    image_item, video_item = read("seedbench", tmp_path)
    assert image_item.prompt == (
        "How many cats?\nA. one\nB. two\nC. three\nD. four"
        "\nAnswer with the option's letter from the given choices directly."
    )
    assert len(video_item.images) == 2
    result = score("seedbench", records([image_item, video_item], ["C", "b"]))
    assert result == {"n": 2, "all/accuracy": 50.0, "image/accuracy": 100.0, "video/accuracy": 0.0}
    assert score("seedbench", records([image_item, video_item], ["c", "a. run"]))["all/accuracy"] == 100.0


def test_mmmu(tmp_path: Path) -> None:
    write(
        tmp_path,
        "MMMU/data/validation-00000-of-00001.parquet",
        {
            "id": (STRING, ["validation_Art_1", "validation_Math_2"]),
            "question": (STRING, ["Which style is <image 2>?", "What is 6 x 7 in <image 1>?"]),
            "options": (STRING, ["['Baroque', 'Cubism']", "[]"]),
            "explanation": (STRING, ["", ""]),
            "image_1": (IMAGE, [png("red"), png("green")]),
            "image_2": (IMAGE, [png("blue"), None]),
            **{f"image_{k}": (IMAGE, [None, None]) for k in range(3, 8)},
            "img_type": (STRING, ["['Paintings']", "['Diagrams']"]),
            "answer": (STRING, ["B", "42"]),
            "topic_difficulty": (STRING, ["Easy", "Easy"]),
            "question_type": (STRING, ["multiple-choice", "open"]),
            "subfield": (STRING, ["Art", "Math"]),
        },
    )
    choice, open_item = read("mmmu", tmp_path)
    assert choice.prompt == (
        "Which style is <image 2>?\nA. Baroque\nB. Cubism\n\nAnswer with the option's letter from the given choices "
        "directly."
    )
    assert [image.getpixel((0, 0)) for image in choice.images] == [(0, 0, 255)]  # only the referenced image
    assert open_item.prompt == "What is 6 x 7 in <image 1>?\n\nAnswer the question using a single word or phrase."
    assert score("mmmu", records([choice, open_item], ["(B)", "The answer is 42."]))["accuracy"] == 100.0


def test_images_stored_as_paths_and_limit(tmp_path: Path) -> None:
    folder = tmp_path / "MME" / "data"
    folder.mkdir(parents=True)
    Image.new("RGB", (5, 4), "green").save(folder / "img.png")
    write(
        tmp_path,
        "MME/data/test-00000-of-00001.parquet",
        {
            "question_id": (STRING, ["a/1.png"] * 3),
            "image": (IMAGE, [{"bytes": None, "path": "img.png"}] * 3),
            "question": (STRING, ["Is it green?"] * 3),
            "answer": (STRING, ["Yes"] * 3),
            "category": (STRING, ["color"] * 3),
        },
    )
    items = read("mme", tmp_path, limit=2)
    assert len(items) == 2
    assert items[0].images[0].size == (5, 4)


def test_missing_files_name_the_benchmark_and_layout(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkFileNotFoundError) as error:
        read_benchmark("pope", tmp_path)
    message = str(error.value)
    assert "'pope'" in message and "lmms-lab/POPE" in message and "data/test-*.parquet" in message
    assert "question_id" in message and "category" in message
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, BenchmarkDataError)


def test_missing_column_names_it(tmp_path: Path) -> None:
    write(
        tmp_path,
        "POPE/data/test-00000-of-00001.parquet",
        {"question_id": (STRING, ["1"]), "question": (STRING, ["?"]), "answer": (STRING, ["yes"])},
    )
    with pytest.raises(BenchmarkDataError, match=r"benchmark 'pope'.*\['category', 'image'\]"):
        read_benchmark("pope", tmp_path)


def test_unknown_benchmark() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'okvqa'"):
        read_benchmark("okvqa", ".")
    with pytest.raises(ValueError, match="unknown benchmark"):
        score("okvqa", [])


def test_every_benchmark_has_generation_settings() -> None:
    assert set(BENCHMARKS) == {
        "vqav2", "gqa", "textvqa", "vizwiz", "scienceqa_img", "pope", "mme", "mmbench", "seedbench", "mmmu",
    }  # fmt: skip
    assert BENCHMARKS["pope"].max_new_tokens == 128
    assert BENCHMARKS["vqav2"].max_new_tokens == 16
    assert BENCHMARKS["textvqa"].max_new_tokens == 1024  # no limit in the task: the wrapper's default
