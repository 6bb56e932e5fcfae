"""Converters to shards on fixtures in every upstream format, every bad-input kind, resume, verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.data import image_bytes

import vargpt.data.datasets_to_shards as driver
from vargpt.data.dataset_formats import AnnotationConverter, ParquetConverter, annotation_cli, iter_json_entries
from vargpt.data.datasets_to_shards import ConvertOptions, run_conversion
from vargpt.data.imagenet import extract_images, imagenet_files, index_rows, write_index
from vargpt.data.shards import iter_raw_samples, parse_record, read_manifest, shard_list, verify_source

REPO = Path(__file__).resolve().parents[1]
BAD_UTF8 = "@@BAD_UTF8@@"


def human_gpt(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def write_json(path: Path, entries: list, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(e) for e in entries) if jsonl else json.dumps(entries, indent=1)
    # Invalid UTF-8 cannot be written through json.dumps: splice the raw bytes in.
    path.write_bytes(text.encode().replace(BAD_UTF8.encode(), b"caf\xe9 \xff"))
    return path


@pytest.fixture
def llava(tmp_path: Path) -> tuple[Path, Path]:
    """LLaVA-1.5 annotations: 3 good entries and one entry of every bad-input kind."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "a.jpg").write_bytes(image_bytes("JPEG"))
    (root / "b.png").write_bytes(image_bytes("PNG", colour=(0, 0, 255)))
    (root / "bad.jpg").write_bytes(b"not an image at all")
    jpeg = image_bytes("JPEG", size=(64, 64))
    (root / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    entries = [
        {"id": "good-image", "image": "coco/a.jpg", "conversations": human_gpt("<image>\nWhat is it?", "A red box.")},
        {"id": "good-text", "conversations": human_gpt("Hello", "Hi!", "How are you?", "Fine.")},
        {"id": "good-png", "image": "b.png", "conversations": human_gpt("Describe <image>", "Blue.", "Sure?", "Yes.")},
        {"id": "missing", "image": "coco/none.jpg", "conversations": human_gpt("<image>\nQ", "A")},
        {"id": "unreadable", "image": "bad.jpg", "conversations": human_gpt("<image>\nQ", "A")},
        {"id": "truncated", "image": "trunc.jpg", "conversations": human_gpt("<image>\nQ", "A")},
        {"id": "mismatch", "image": "coco/a.jpg", "conversations": human_gpt("No placeholder here", "A")},
        {"id": "empty", "image": "coco/a.jpg", "conversations": []},
        {"id": "malformed", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "non-utf8", "conversations": human_gpt(f"Text {BAD_UTF8}", "A")},
        42,
    ]
    return write_json(tmp_path / "llava_v1_5_mix665k.json", entries), root


BAD_KINDS = {
    "image_missing": "missing",
    "image_unreadable": "unreadable",
    "image_truncated": "truncated",
    "placeholder_mismatch": "mismatch",
    "empty_conversation": "empty",
    "malformed_conversation": "malformed",
    "non_utf8": "non-utf8",
    "malformed_entry": "#10",
}


def records(source: Path) -> list[tuple[dict, list[bytes]]]:
    return [parse_record(raw) for raw in iter_raw_samples([p for p, _ in shard_list(source)])]


def test_llava_conversion_counts_every_bad_kind(llava, tmp_path):
    annotations, root = llava
    out = tmp_path / "out"
    manifest = run_conversion(AnnotationConverter(annotations, root, "llava"), ConvertOptions(out))
    assert manifest["num_samples"] == 3 and manifest["num_entries"] == 11
    assert manifest["skipped_by_reason"] == {reason: 1 for reason in BAD_KINDS}
    assert manifest["num_skipped"] == len(BAD_KINDS)
    listed = {e["reason"]: e["id"] for e in manifest["skipped_examples"]}
    assert listed == BAD_KINDS
    assert verify_source(out).ok
    got = {r["id"]: (r, imgs) for r, imgs in records(out)}
    assert set(got) == {"good-image", "good-text", "good-png"}
    record, imgs = got["good-image"]
    assert record["messages"][0] == {"role": "user", "content": "<image>\nWhat is it?"}
    assert record["images"] == ["img0.jpg"] and record["source"] == "llava"
    assert imgs == [(root / "coco" / "a.jpg").read_bytes()]  # original bytes, not re-encoded
    assert got["good-png"][0]["images"] == ["img0.png"] and got["good-text"][0]["images"] == []
    shards = manifest["shards"]
    assert sum(s["num_samples"] for s in shards) == 3 and all(len(s["sha256"]) == 64 for s in shards)


def test_sharegpt_generation_format_both_spellings_and_jsonl(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for name, colour in (("cat.jpg", (10, 200, 10)), ("dog.jpg", (10, 10, 200))):
        (root / name).write_bytes(image_bytes("JPEG", colour=colour))
    (root / "anim.gif").write_bytes(image_bytes("GIF"))
    entries = [
        {
            "messages": [
                {"role": "user", "content": "I need a drawing of a cat."},
                {"role": "assistant", "content": "Here is a cat.<image_gen>"},
            ],
            "images": ["ImageNet/cat.jpg"],  # folder prefix: resolved by file name under the root
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>\nWhat animal?"},
                {"role": "assistant", "content": "A dog."},
                {"role": "user", "content": "Draw it as a cat."},
                {"role": "assistant", "content": "Sure!<image_gen>"},
            ],
            "images": ["dog.jpg", "cat.jpg"],
        },
        {"conversations": human_gpt("<image>\nWhat is it?", "A gif."), "images": ["anim.gif"]},
        {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], "images": []},
    ]
    for jsonl in (False, True):
        ann = write_json(tmp_path / f"ImageNet-Instruct-5k.json{'l' * jsonl}", entries, jsonl=jsonl)
        out = tmp_path / f"out{jsonl}"
        manifest = run_conversion(AnnotationConverter(ann, root, "imagenet_instruct_5k"), ConvertOptions(out))
        assert manifest["num_samples"] == 3 and manifest["skipped_by_reason"] == {"placeholder_mismatch": 1}
        got = {r["id"]: r for r, _ in records(out)}
        assert got["#1"]["images"] == ["img0.jpg", "img1.jpg"] and got["#1"]["messages"][0]["role"] == "system"
        assert got["#2"]["images"] == ["img0.png"]  # GIF re-encoded
        assert verify_source(out).ok


def test_truncated_annotation_file_keeps_the_entries_before_the_cut(tmp_path):
    entries = [{"id": str(i), "conversations": human_gpt(f"Q{i}", f"A{i}")} for i in range(3)]
    path = write_json(tmp_path / "cut.json", entries)
    path.write_bytes(path.read_bytes()[:-40])
    assert [e["id"] for e in iter_json_entries(path) if isinstance(e, dict)] == ["0", "1"]
    manifest = run_conversion(AnnotationConverter(path, tmp_path, "cut"), ConvertOptions(tmp_path / "out"))
    assert manifest["num_samples"] == 2 and manifest["skipped_by_reason"] == {"truncated_annotations": 1}


def onevision_files(tmp_path: Path) -> list[str]:
    """Two OneVision-style parquet files; row groups of 2 rows; the second has a non-UTF-8 data_source."""
    (tmp_path / "ov_images").mkdir()
    (tmp_path / "ov_images" / "side.png").write_bytes(image_bytes("PNG"))
    conv = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    jpeg = image_bytes("JPEG", size=(64, 64))
    rows = [
        ("ov-0", {"bytes": jpeg, "path": "0.jpg"}, human_gpt("<image>\nRead the chart.", "42"), "chartqa"),
        ("ov-1", None, human_gpt("Explain gravity.", "Mass attracts."), "text_only"),
        ("ov-2", {"bytes": None, "path": "side.png"}, human_gpt("<image>\nColour?", "Red."), "sidecar"),
        ("ov-3", {"bytes": jpeg[:300], "path": "t.jpg"}, human_gpt("<image>\nQ", "A"), "broken"),
        ("ov-4", {"bytes": jpeg, "path": "4.jpg"}, human_gpt("Q without placeholder", "A"), "mismatch"),
    ]
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "image": pa.array([r[1] for r in rows], image),
            "conversations": pa.array([r[2] for r in rows], conv),
            "data_source": [r[3] for r in rows],
        }
    )
    first = tmp_path / "ov-part0.parquet"
    pq.write_table(table, first, row_group_size=2)
    second = tmp_path / "ov-part1.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["ov-5"],
                "conversations": pa.array([human_gpt("Hi", "Hello")], conv),
                "data_source": pa.array([b"\xff\xfe"], pa.binary()),
            }
        ),
        second,
    )
    return [str(first), str(second)]


def test_onevision_parquet_conversion(tmp_path):
    files = onevision_files(tmp_path)
    converter = ParquetConverter(files, "llava_onevision", image_root=tmp_path / "ov_images")
    manifest = run_conversion(converter, ConvertOptions(tmp_path / "out", part_size=2))
    assert manifest["num_entries"] == 6 and manifest["num_samples"] == 3
    assert manifest["skipped_by_reason"] == {"image_truncated": 1, "non_utf8": 1, "placeholder_mismatch": 1}
    got = {r["id"]: r for r, _ in records(tmp_path / "out")}
    assert got["ov-0"]["meta"] == {"data_source": "chartqa"} and got["ov-0"]["images"] == ["img0.jpg"]
    assert got["ov-1"]["images"] == [] and got["ov-2"]["images"] == ["img0.png"]
    assert verify_source(tmp_path / "out").ok
    limited = run_conversion(converter, ConvertOptions(tmp_path / "lim", part_size=2, limit=3))
    assert limited["num_entries"] == 3


def test_idempotent_rerun_and_refusal_to_mix_outputs(llava, tmp_path):
    annotations, root = llava
    converter = AnnotationConverter(annotations, root, "llava")
    out = tmp_path / "out"
    first = run_conversion(converter, ConvertOptions(out, part_size=4))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run_conversion(converter, ConvertOptions(out, part_size=4))
    assert again == first and stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    with pytest.raises(FileExistsError):
        run_conversion(converter, ConvertOptions(out, part_size=5))
    replaced = run_conversion(converter, ConvertOptions(out, part_size=5, overwrite=True))
    assert replaced["num_samples"] == first["num_samples"] and read_manifest(out) == replaced
    # Byte-identical shards for the same input (fixed tar metadata): checksums are reproducible.
    fresh = run_conversion(converter, ConvertOptions(tmp_path / "fresh", part_size=4))
    assert [s["sha256"] for s in fresh["shards"]] == [s["sha256"] for s in first["shards"]]


def test_interrupted_conversion_resumes_without_redoing_parts(llava, tmp_path, monkeypatch):
    annotations, root = llava
    converter = AnnotationConverter(annotations, root, "llava")
    reference = run_conversion(converter, ConvertOptions(tmp_path / "ref", part_size=2))
    original = driver.convert_part
    calls: list[int] = []

    def crash_on_part_3(conv, part, options):
        if part.index == 3:
            raise KeyboardInterrupt
        calls.append(part.index)
        return original(conv, part, options)

    monkeypatch.setattr(driver, "convert_part", crash_on_part_3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_conversion(converter, ConvertOptions(out, part_size=2))
    assert calls == [0, 1, 2] and not (out / "manifest.json").exists()

    def counting(conv, part, options):
        calls.append(part.index)
        return original(conv, part, options)

    calls.clear()
    monkeypatch.setattr(driver, "convert_part", counting)
    resumed = run_conversion(converter, ConvertOptions(out, part_size=2))
    assert calls == [3, 4, 5]
    assert resumed["shards"] == reference["shards"] and resumed["skipped_by_reason"] == reference["skipped_by_reason"]


def test_multi_process_conversion_matches_in_process(llava, tmp_path):
    annotations, root = llava
    converter = AnnotationConverter(annotations, root, "llava")
    single = run_conversion(converter, ConvertOptions(tmp_path / "one", part_size=3))
    multi = run_conversion(converter, ConvertOptions(tmp_path / "two", part_size=3, num_workers=2))
    assert multi["shards"] == single["shards"] and multi["skipped_by_reason"] == single["skipped_by_reason"]


def test_shard_size_limits(llava, tmp_path):
    annotations, root = llava
    manifest = run_conversion(
        AnnotationConverter(annotations, root, "llava"), ConvertOptions(tmp_path / "o", shard_max_samples=1)
    )
    assert [s["num_samples"] for s in manifest["shards"]] == [1, 1, 1]
    by_bytes = run_conversion(
        AnnotationConverter(annotations, root, "llava"), ConvertOptions(tmp_path / "b", shard_max_bytes=2048)
    )
    assert len(by_bytes["shards"]) > 1 and all(s["size_bytes"] < 2048 + 10240 for s in by_bytes["shards"])


def test_verify_catches_tampering(llava, tmp_path):
    annotations, root = llava
    out = tmp_path / "out"
    run_conversion(AnnotationConverter(annotations, root, "llava"), ConvertOptions(out, shard_max_samples=1))
    assert verify_source(out).ok
    shard = sorted(out.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0xFF  # inside the first image member
    shard.write_bytes(bytes(data))
    report = verify_source(out)
    assert not report.ok and any("sha256" in p for p in report.problems)
    verify = [sys.executable, str(REPO / "data_prep" / "verify_shards.py"), str(out)]
    result = subprocess.run(verify, capture_output=True, text=True)
    assert result.returncode == 1 and "FAILED" in result.stdout
    sorted(out.glob("*.tar"))[1].unlink()
    assert any("missing" in p for p in verify_source(out).problems)


def test_imagenet_parquet_index_and_extraction(tmp_path):
    data = tmp_path / "ImageNet" / "data"
    data.mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for f in range(2):
        rows = [
            {"bytes": image_bytes("JPEG", colour=(f * 100, i * 50, 0)), "path": f"n0144076{f}_{i}.JPEG"}
            for i in range(3)
        ]
        pq.write_table(
            pa.table({"image": pa.array(rows, image), "label": [f, f, f]}), data / f"train-0000{f}-of-00002.parquet"
        )
    (data / "README.md").write_text("not a parquet")
    files = imagenet_files(data)
    assert [p.name for p in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    rows = list(index_rows(files))
    assert rows[4] == {
        "name": "image_1_1.jpg",
        "parquet_file": "train-00001-of-00002.parquet",
        "row": 1,
        "original_path": "n01440761_1.JPEG",
        "prefix": "n01440761_1.JPEG",
        "label": 1,
    }
    assert write_index(files, tmp_path / "index.parquet") == 6
    assert extract_images(files, tmp_path / "images") == 6
    assert extract_images(files, tmp_path / "images") == 0  # resumable: nothing rewritten
    assert (tmp_path / "images" / "image_1_2.jpg").read_bytes() == pq.read_table(files[1])["image"][2]["bytes"].as_py()
    messages = [{"role": "user", "content": "Draw a tench."}, {"role": "assistant", "content": "Here.<image_gen>"}]
    entry = {"messages": messages, "images": ["ImageNet/image_1_2.jpg"]}
    ann = write_json(tmp_path / "ImageNet-Instruct-130k.json", [entry])
    manifest = run_conversion(AnnotationConverter(ann, tmp_path / "images", "in130k"), ConvertOptions(tmp_path / "o"))
    assert manifest["num_samples"] == 1


@pytest.mark.parametrize(
    "script",
    [
        "llava_to_shards",
        "sharegpt_to_shards",
        "preference_to_shards",
        "onevision_to_shards",
        "imagenet_parquet_index",
        "make_shapes",
        "verify_shards",
        "encode_gen_codes",
    ],
)
def test_scripts_have_help(script):
    result = subprocess.run(
        [sys.executable, f"data_prep/{script}.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage" in result.stdout


def test_llava_script_end_to_end(llava, tmp_path):
    annotations, root = llava
    args = ["--annotations", annotations, "--image-root", root, "--out", tmp_path / "cli", "--shard-max-samples", "2"]
    result = subprocess.run(
        [sys.executable, "data_prep/llava_to_shards.py", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "3 samples" in result.stdout and "image_truncated: 1" in result.stdout
    assert read_manifest(tmp_path / "cli")["source"] == "llava_v1_5_mix665k"


# ------------------------------------------------------------------------------------------- input that gives no source
ANNOTATION_FAULTS = {
    "missing": (None, "no such file"),
    "zero-bytes": (b"", "the file is empty (0 bytes)"),
    "whitespace": (b"\n  \n", "no entry"),
    "empty-array": (b"[]", "no entry"),
    "csv": (b"id,image,question\n1,a.jpg,What?\n", "not a JSON array or JSON-lines file"),
    "no-sample": (json.dumps([{"id": "x", "conversations": []}]).encode(), "no sample converted from 1 entries"),
}


@pytest.mark.parametrize("fault", ANNOTATION_FAULTS)
def test_annotation_converter_refuses_input_that_gives_no_source(tmp_path, capsys, fault):
    content, expected = ANNOTATION_FAULTS[fault]
    path = tmp_path / "ann.json"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    argv = ["--annotations", str(path), "--image-root", str(tmp_path), "--out", str(out)]
    assert annotation_cli(argv, "test") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: annotations {path}: ") and expected in err and err.count("\n") == 1
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))


def test_a_conversion_with_no_sample_leaves_nothing_and_a_corrected_rerun_converts(tmp_path):
    ann = write_json(tmp_path / "a.json", [{"id": "a", "image": "a.jpg", "conversations": human_gpt("<image>Q", "A")}])
    (tmp_path / "wrong").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(image_bytes())
    out = tmp_path / "out"
    with pytest.raises(driver.BadInputError, match=r"no sample converted .*image_missing.*--image-root"):
        run_conversion(AnnotationConverter(ann, tmp_path / "wrong", "a"), ConvertOptions(out))
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == []
    assert run_conversion(AnnotationConverter(ann, tmp_path / "images", "a"), ConvertOptions(out))["num_samples"] == 1


def onevision_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("onevision_cli", REPO / "data_prep" / "onevision_to_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fault", ["zero-bytes", "not-parquet", "no-conversations", "no-sample"])
def test_onevision_converter_refuses_input_that_gives_no_source(tmp_path, capsys, fault):
    path = tmp_path / "ov.parquet"
    conv = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    if fault == "zero-bytes":
        path.write_bytes(b"")
    elif fault == "not-parquet":
        path.write_text("id,image\n")
    elif fault == "no-conversations":
        pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), path)
    else:
        pq.write_table(pa.table({"id": ["a"], "conversations": pa.array([[]], conv)}), path)
    expected = {
        "zero-bytes": "not a readable parquet file",
        "not-parquet": "not a readable parquet file",
        "no-conversations": "no 'conversations' column",
        "no-sample": "no sample converted from 1 entries (skipped {'empty_conversation': 1}",
    }[fault]
    out = tmp_path / "out"
    assert onevision_cli().main(["--parquet", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: parquet {path}") and expected in err and err.count("\n") == 1
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("script", ["llava_to_shards", "sharegpt_to_shards", "preference_to_shards"])
def test_annotation_scripts_exit_1_with_one_line_on_an_empty_file(tmp_path, script):
    (tmp_path / "empty.json").write_bytes(b"")
    args = ["--annotations", tmp_path / "empty.json", "--image-root", tmp_path, "--out", tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, f"data_prep/{script}.py", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr
        == f"error: annotations {tmp_path / 'empty.json'}: the file is empty (0 bytes); download it again\n"
    )
